"""Where a flow run's results are persisted: beside the registry when the registry is on a store.

Prefect persists a run's result (and its tasks' results) in its local storage by default; a team
whose machines share only a store would find there none of the results a run on another machine
persisted. A flow run whose artifacts root is a store URL keeps them under
`<artifacts root>/prefect-results/` instead, through Prefect's own remote file system block. A
flow's result storage is fixed when it is decorated, before the run knows its parameters, so the
run's own result store is switched once, first thing in the flow.
"""

from __future__ import annotations

from headstart.config import Place, is_url

RESULTS_FOLDER = "prefect-results"


def keep_results_in(artifacts_root: Place) -> None:
    """Persists this flow run's results, and its tasks', under the store's artifacts root; a local
    artifacts root leaves Prefect's default in place."""
    if not is_url(artifacts_root):
        return
    from prefect.context import FlowRunContext
    from prefect.filesystems import RemoteFileSystem

    context = FlowRunContext.get()
    if context is None:
        return
    storage = RemoteFileSystem(basepath=f"{artifacts_root}/{RESULTS_FOLDER}")
    context.result_store = context.result_store.model_copy(update={"result_storage": storage})
