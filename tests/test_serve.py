"""`headstart serve` builds its deployments from prefect.yaml: the same names, parameters, tags,
schedules and triggers."""

from pathlib import Path

import yaml
from servers import PROJECT


def test_serve_builds_exactly_the_deployments_of_prefect_yaml():
    from flows.serve import project_deployments

    served = {deployment.name: deployment for deployment in project_deployments()}
    spec = {entry["name"]: entry for entry in yaml.safe_load((PROJECT / "prefect.yaml").read_text())["deployments"]}
    assert set(served) == set(spec) == {"train", "retrain-nightly", "retrain", "watch", "predict"}
    for name, entry in spec.items():
        assert served[name].parameters == entry["parameters"] and served[name].tags == entry["tags"]
        (path, function), (entry_path, entry_function) = (
            served[name].entrypoint.rsplit(":", 1),
            entry["entrypoint"].rsplit(":", 1),
        )
        assert (Path(path).resolve(), function) == ((PROJECT / entry_path).resolve(), entry_function)
    (nightly,) = served["retrain-nightly"].schedules
    assert (nightly.schedule.cron, nightly.schedule.timezone, nightly.active) == ("0 3 * * *", "UTC", True)
    assert served["train"].schedules == [] and served["predict"].schedules == []
    (watch,) = served["watch"].schedules
    assert (watch.schedule.interval.total_seconds(), watch.active) == (300, True)
    (trigger,) = served["retrain"].triggers
    assert trigger.expect == {"headstart.data.changed"} and trigger.parameters["data"].startswith("{{ event.")
    assert served["train"]._parameter_openapi_schema.required == ["data"]
