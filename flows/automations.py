"""The automations that tell people what a scheduled run cannot: a train, retrain, predict or
watch run that failed or crashed, and a training run whose model the gate kept out. Each sends a
notification through one notification block (Slack, e-mail, a webhook: any block that can
notify), and is created or replaced by its name, so that setting them up again changes nothing
but the block."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from headstart.errors import HeadstartError
from tasks.events import MODEL_KEPT, MODEL_RESOURCE_PREFIX

# Every deployment of these flows is covered: retrain-nightly and retrain run `train`; a watch
# that fails means that no retrain starts.
NOTIFIED_FLOWS = ("train", "predict", "watch")
# Prefect's flow-run states that mean the run did not do its work (TimedOut is a Failed state).
FAILED_STATES = ("Failed", "Crashed", "TimedOut")
RUN_FAILED = "headstart: a train, predict or watch run failed"
CHAMPION_KEPT = "headstart: the gate kept the champion"

FAILED_SUBJECT = "headstart: {{ flow.name }} run {{ flow_run.name }} {{ flow_run.state.name }}"
FAILED_BODY = """\
Flow run {{ flow.name }}/{{ flow_run.name }} ended {{ flow_run.state.name }} at {{ flow_run.state.timestamp }}.
{{ flow_run.state.message }}
Flow run ID: {{ flow_run.id }}
"""
KEPT_SUBJECT = "headstart: {{ event.resource.name }} not promoted by the gate"
KEPT_BODY = """\
{{ event.payload.message }}
Run directory: {{ event.resource['headstart.run-dir'] }}
Flow run: {{ flow_run.name }}
"""
# The flow run's page. Prefect's own `ui_url` filter renders as None on a server that is not told
# its own address (PREFECT_UI_URL), as `prefect server start` is not: the address is written in.
RUN_PAGE = "{dashboard}/runs/flow-run/{{{{ flow_run.id }}}}\n"


def automations(block_id: UUID, dashboard_url: str | None = None) -> list[AutomationCore]:
    """headstart's automations, each notifying through the block `block_id`, with a link to the
    flow run's page on the dashboard at `dashboard_url` where it is given."""
    link = RUN_PAGE.format(dashboard=dashboard_url.rstrip("/")) if dashboard_url else ""
    failed = EventTrigger(
        expect={f"prefect.flow-run.{state}" for state in FAILED_STATES},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(NOTIFIED_FLOWS)},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )
    kept = EventTrigger(
        expect={MODEL_KEPT},
        match={"prefect.resource.id": f"{MODEL_RESOURCE_PREFIX}*"},
        for_each={"prefect.resource.id"},
        posture=Posture.Reactive,
        threshold=1,
        within=timedelta(0),
    )
    return [
        AutomationCore(
            name=RUN_FAILED,
            description=f"Notifies when a run of the flows {', '.join(NOTIFIED_FLOWS)} ends "
            f"{' or '.join(FAILED_STATES)} (set up by `headstart notify`).",
            trigger=failed,
            actions=[SendNotification(block_document_id=block_id, subject=FAILED_SUBJECT, body=FAILED_BODY + link)],
        ),
        AutomationCore(
            name=CHAMPION_KEPT,
            description=f"Notifies when the gate keeps a new model out ({MODEL_KEPT}; set up by `headstart notify`).",
            trigger=kept,
            actions=[SendNotification(block_document_id=block_id, subject=KEPT_SUBJECT, body=KEPT_BODY + link)],
        ),
    ]


def notification_block(reference: str) -> tuple[UUID, str]:
    """The id and `type/name` of the notification block `reference` names: `type/name`, as
    `prefect block ls` lists blocks, or a name alone where one notification block has it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    how = (
        "create one first (docs/unattended.md: `prefect block create slack-webhook`, or Python), "
        "then give it as TYPE/NAME, as `prefect block ls` lists it"
    )
    with get_client(sync_client=True) as client:
        if "/" in reference:
            slug, name = reference.split("/", 1)
            try:
                found = [client.read_block_document_by_name(name=name, block_type_slug=slug, include_secrets=False)]
            except ObjectNotFound:
                found = []
        else:
            found = [
                document
                for document in client.read_block_documents(include_secrets=False)
                if document.name == reference and not document.is_anonymous
            ]
    if not found:
        raise HeadstartError(f"no notification block {reference} on the Prefect server; {how}")
    notifying = [
        document for document in found if document.block_schema and "notify" in document.block_schema.capabilities
    ]
    if not notifying:
        raise HeadstartError(f"block {reference} cannot send notifications; give a notification block ({how})")
    if len(notifying) > 1:
        names = ", ".join(f"{document.block_type.slug}/{document.name}" for document in notifying)
        raise HeadstartError(f"several notification blocks are named {reference} ({names}); give one as TYPE/NAME")
    document = notifying[0]
    return document.id, f"{document.block_type.slug}/{document.name}"


def set_up(block_id: UUID, dashboard_url: str | None = None) -> list[tuple[str, str]]:
    """Creates headstart's automations, or replaces those of the same name; returns (name,
    "created" or "updated") for each."""
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for automation in automations(block_id, dashboard_url):
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                # Duplicates made by hand would notify twice.
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
                done.append((automation.name, "updated"))
            else:
                client.create_automation(automation)
                done.append((automation.name, "created"))
    return done
