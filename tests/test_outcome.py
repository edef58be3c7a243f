"""How a training run's outcome shows: the flow run's state message, the first line of a
candidate's report, the events, the champion's variable and artifact."""

import os
import subprocess
import sys
from pathlib import Path

from test_flow import _smoke_config, _with_swapped_training_labels
from test_registry import _run_dir

from headstart.promotion.mcnemar import GateDecision, against_champion, different_classes, first_model
from headstart.registry.runs import Run
from headstart.reporting.outcome import KEPT, PROMOTED, outcome, report_headline, state_message

CANDIDATE = "20261204T101500Z-abcd"
CHAMPION = "20261203T030000Z-0123"


def _against(candidate_right: int, champion_right: int, both_right: int = 80, **options) -> GateDecision:
    """A decision on 100 images: `candidate_right` only the candidate gets right, `champion_right`
    only the champion, `both_right` both."""
    neither = 100 - candidate_right - champion_right - both_right
    candidate = [True] * both_right + [True] * candidate_right + [False] * champion_right + [False] * neither
    champion = [True] * both_right + [False] * candidate_right + [True] * champion_right + [False] * neither
    return against_champion(candidate, champion, CHAMPION, **options)


def test_a_promotion_says_the_new_version_both_accuracies_and_the_p_value():
    decision = _against(candidate_right=5, champion_right=3)
    assert decision.promote
    assert state_message(CANDIDATE, 0.85, decision) == f"promoted {CANDIDATE}: 0.8500 vs 0.8300 ({CHAMPION}), p = 0.855"
    assert outcome(CANDIDATE, decision) == PROMOTED and report_headline(CANDIDATE, decision) == ""


def test_the_first_champion_says_which_floor_it_beat():
    decision = first_model([True] * 9 + [False], [0] * 6 + [1] * 4)
    message = state_message(CANDIDATE, 0.9, decision)
    assert message == f"promoted {CANDIDATE}, the first champion: 0.9000 vs floor 0.6000"


def test_a_kept_champion_says_the_candidates_accuracy_is_below_the_champions():
    decision = _against(candidate_right=2, champion_right=5)
    assert not decision.promote
    message = state_message(CANDIDATE, 0.82, decision)
    assert message == f"kept champion {CHAMPION}: candidate {CANDIDATE} 0.8200 < 0.8500"
    assert outcome(CANDIDATE, decision) == KEPT
    assert report_headline(CANDIDATE, decision).startswith(f"**Not promoted:** kept champion {CHAMPION}: candidate")


def test_a_candidate_within_tolerance_but_shown_worse_says_so_with_the_p_value():
    decision = _against(candidate_right=0, champion_right=8, both_right=84, tolerance=0.1)
    assert not decision.promote
    assert state_message(CANDIDATE, 0.84, decision) == (
        f"kept champion {CHAMPION}: candidate {CANDIDATE} 0.8400 vs 0.9200, shown worse (p = 0.00391)"
    )


def test_other_refusals_give_the_gates_own_reason():
    decision = different_classes(["cat", "dog"], ["ant", "bee"], CHAMPION, 0.9, 20)
    assert state_message(CANDIDATE, 0.9, decision) == f"{CANDIDATE} not promoted: {decision.reason}"
    assert outcome(CANDIDATE, decision) == KEPT


def test_with_the_gate_off_nothing_is_decided_and_the_report_says_how_to_promote_by_hand():
    assert state_message(CANDIDATE, 0.8123, None) == f"{CANDIDATE} not promoted (gate off): test accuracy 0.8123"
    assert outcome(CANDIDATE, None) is None
    assert report_headline(CANDIDATE, None).startswith("**Not promoted:** the gate was off")
    assert f"headstart models promote {CANDIDATE}" in report_headline(CANDIDATE, None)


def test_a_run_that_is_the_champion_already_is_neither_promoted_nor_kept():
    decision = GateDecision(False, f"{CANDIDATE}, whose inputs ...: nothing to change", 10, 0.9, champion=CANDIDATE)
    assert outcome(CANDIDATE, decision) is None and report_headline(CANDIDATE, decision) == ""
    assert state_message(CANDIDATE, 0.9, decision) == f"{CANDIDATE} is the champion already; nothing changed"


def test_the_flow_runs_state_message_is_the_gates_outcome_and_the_champion_and_events_follow_it(
    prefect_harness, colour_folder, tiny_backbone_dir, tmp_path, monkeypatch
):
    import prefect.events
    from prefect.artifacts import Artifact
    from prefect.variables import Variable

    from flows.train import train

    emitted = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **event: emitted.append(event))
    config = _smoke_config(colour_folder, tiny_backbone_dir, tmp_path)
    first = train(**config.flat(), return_state=True)
    first_dir = Path(first.result())
    assert first.is_completed() and first.message.startswith(f"promoted {first_dir.name}, the first champion: ")
    champion = Variable.get("headstart_champion")
    assert (champion["version"], champion["run_dir"], champion["by"]) == (first_dir.name, str(first_dir), "gate")
    assert champion["accuracy"] == Run(first_dir).metrics["accuracy"]
    report = Artifact.get("headstart-champion").data
    assert report.startswith("**Champion** of the registry") and f"# headstart run `{first_dir.name}`" in report
    assert not Artifact.get("headstart-report").data.startswith("**Not promoted")
    [promoted] = emitted
    assert promoted["event"] == "headstart.model.promoted"
    assert promoted["resource"]["prefect.resource.id"] == f"headstart.model.{first_dir.name}"
    assert promoted["resource"]["headstart.champion"] == first_dir.name
    assert promoted["resource"]["headstart.run-dir"] == str(first_dir)

    worse = _with_swapped_training_labels(
        colour_folder, tmp_path / "worse", config.data.validation_fraction, config.data.test_fraction
    )
    second = train(**config.with_options(data=str(worse)).flat(), return_state=True)
    second_dir = Path(second.result())
    assert second.is_completed()
    assert second.message.startswith(f"kept champion {first_dir.name}: candidate {second_dir.name}")
    assert Artifact.get("headstart-report").data.startswith(f"**Not promoted:** kept champion {first_dir.name}")
    assert Variable.get("headstart_champion")["version"] == first_dir.name
    kept = emitted[1]
    assert kept["event"] == "headstart.model.kept" and kept["resource"]["prefect.resource.name"] == second_dir.name
    assert kept["resource"]["headstart.champion"] == first_dir.name and kept["payload"]["message"] == second.message
    assert kept["payload"]["gate"]["champion_accuracy"] > kept["payload"]["gate"]["candidate_accuracy"]

    # The same inputs again: the run is the candidate already kept out, and stays out.
    third = train(**config.with_options(data=str(worse)).flat(), return_state=True)
    assert third.message.startswith(f"kept champion {first_dir.name}") and len(emitted) == 3


def test_promote_and_rollback_by_hand_show_the_new_champion_on_the_dashboard(prefect_harness, tmp_path):
    from prefect.artifacts import Artifact
    from prefect.variables import Variable

    from flows.cli import main

    root = tmp_path / "artifacts"
    older, newer = (_run_dir(root, name, accuracy) for name, accuracy in (("20261201-1", 0.81), ("20261202-2", 0.84)))
    assert main(["models", "promote", older.name, "--artifacts-root", str(root)]) == 0
    assert main(["models", "promote", newer.name, "--artifacts-root", str(root), "--reason", "looked better"]) == 0
    champion = Variable.get("headstart_champion")
    assert (champion["version"], champion["accuracy"], champion["reason"]) == (newer.name, 0.84, "looked better")
    assert champion["artifacts_root"] == str(root.absolute()) and champion["previous"] == older.name
    assert f"run `{newer.name}`" in Artifact.get("headstart-champion").data
    assert main(["models", "rollback", "--artifacts-root", str(root)]) == 0
    assert Variable.get("headstart_champion")["version"] == older.name
    assert "rolled back by hand" in Artifact.get("headstart-champion").data.splitlines()[0]


def test_a_switch_by_hand_is_made_when_no_prefect_server_answers(tmp_path):
    from servers import free_port

    from headstart.registry import versions as registry

    root = tmp_path / "artifacts"
    run = _run_dir(root, "20261201-1", 0.81)
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api", "PREFECT_HOME": str(tmp_path)}
    switched = subprocess.run(
        [sys.executable, "-m", "flows.cli", "models", "promote", run.name, "--artifacts-root", str(root)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert switched.returncode == 0 and switched.stdout == f"champion: {run.name} (was none)\n"
    assert registry.champion_version(root) == run.name
    assert (
        switched.stderr.startswith("headstart: warning: the Prefect server at") and "Traceback" not in switched.stderr
    )


def test_notify_sets_up_the_automations_once_by_name_through_the_block_given(prefect_harness, capsys):
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL

    from flows.automations import CHAMPION_KEPT, RUN_FAILED
    from flows.cli import main

    first = CustomWebhookNotificationBlock(name="team", url="http://127.0.0.1:9/hook", json_data={"text": "{{body}}"})
    first_id = first.save("headstart-test-first", overwrite=True)
    second_id = CustomWebhookNotificationBlock(name="team", url="http://127.0.0.1:9/other").save(
        "headstart-test-second", overwrite=True
    )
    Secret(value="not a notifier").save("headstart-test-secret", overwrite=True)

    assert main(["notify", "--block", "custom-webhook/headstart-test-first"]) == 0
    assert capsys.readouterr().out.count("created; it notifies through custom-webhook/headstart-test-first") == 2
    assert main(["notify", "--block", "headstart-test-second"]) == 0
    assert capsys.readouterr().out.count("updated; it notifies through custom-webhook/headstart-test-second") == 2
    with get_client(sync_client=True) as client:
        ours = {a.name: a for a in client.read_automations() if a.name.startswith("headstart: ")}
    assert sorted(ours) == sorted([RUN_FAILED, CHAMPION_KEPT])
    assert all([action.block_document_id for action in a.actions] == [second_id] for a in ours.values())
    assert first_id != second_id
    failed = ours[RUN_FAILED].trigger
    assert failed.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed", "prefect.flow-run.TimedOut"}
    assert failed.match_related.model_dump() == {
        "prefect.resource.role": "flow",
        "prefect.resource.name": ["train", "predict", "watch"],
    }
    assert ours[CHAMPION_KEPT].trigger.expect == {"headstart.model.kept"}
    assert all(
        a.actions[0].body.endswith(f"{PREFECT_UI_URL.value()}/runs/flow-run/{{{{ flow_run.id }}}}\n")
        for a in ours.values()
    )

    assert main(["notify", "--block", "custom-webhook/nope"]) == 2
    assert "no notification block custom-webhook/nope" in capsys.readouterr().err
    assert main(["notify", "--block", "secret/headstart-test-secret"]) == 2
    assert "cannot send notifications" in capsys.readouterr().err
