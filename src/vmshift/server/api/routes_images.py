"""Images: import a disk image file onto a datastore (a task). docs/images.md."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from vmshift.model.api import Task, TaskKind
from vmshift.model.images import AgentImageImport, ImageImportRequest, is_ova
from vmshift.server.api.deps import core_of
from vmshift.server.api.openapi import BODY, errors
from vmshift.server.core import ServerCore
from vmshift.server.image_import import choose_host, import_body, ova_jobs
from vmshift.server.tasks import TaskEngine
from vmshift.server.views import task_view

router = APIRouter()


@router.post("/images/import", status_code=202, responses=errors(*BODY, 404, 409, 502))
async def import_image(body: ImageImportRequest, core: ServerCore = Depends(core_of)) -> Task:
    """Import ``file`` (a path on the importing host) as disk image ``name`` on ``datastore``: the
    host's agent checks it with qemu-img first (a corrupt, truncated or unknown file is refused here,
    nothing written), then the task converts it to qcow2 with progress. An OVA (``*.ova``) gives
    one image per disk: ``name`` for a lone disk, else ``name-diskN``."""

    def pick() -> tuple[str, str]:
        with core.sessions() as s:
            return choose_host(s, body)

    host, address = await run_in_threadpool(pick)
    agent = core.agents.get(address)
    jobs = [AgentImageImport(file=body.file, name=body.name, datastore=body.datastore, format=body.format)]
    if is_ova(body.file):
        jobs = ova_jobs(await agent.inspect_ova(body.file), body)
        if len(jobs) > 1:

            def pick_all() -> None:
                with core.sessions() as s:
                    choose_host(s, body, [job.name for job in jobs])

            await run_in_threadpool(pick_all)
    await agent.import_image(jobs[0])

    def write() -> Task:
        with core.sessions.begin() as s:
            params = {"file": body.file, "datastore": body.datastore, "host": host}
            return task_view(TaskEngine.create(s, TaskKind.IMAGE_IMPORT, body.name, params))

    view = await run_in_threadpool(write)
    core.tasks.start(view.id, body.name, import_body(core.sessions, core.agents, jobs, host, address))
    return view
