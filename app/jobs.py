"""Long-running work (vector extraction) as jobs: ``202`` with an id, then ``GET /v1/jobs/{id}``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

log = logging.getLogger(__name__)


@dataclass
class Job:
    id: str
    kind: str
    status: str = "queued"  # queued | running | succeeded | failed
    created: float = field(default_factory=time.time)
    finished: float | None = None
    progress: int = 0
    total: int | None = None
    result: dict | None = None
    error: str | None = None

    def view(self) -> dict:
        return {"id": self.id, "object": "job", "kind": self.kind, "status": self.status,
                "created": int(self.created), "finished": int(self.finished) if self.finished else None,
                "progress": {"done": self.progress, "total": self.total}, "result": self.result, "error": self.error}


class JobStore:
    """Jobs of this process, newest kept; a job runs as a task on the server's event loop."""

    def __init__(self, keep: int = 256):
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._keep = keep

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def submit(self, kind: str, work: Callable[[Job], Awaitable[dict]], total: int | None = None) -> Job:
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind, total=total)
        self._jobs[job.id] = job
        while len(self._jobs) > self._keep:
            self._jobs.pop(next(iter(self._jobs)))

        async def run():
            job.status = "running"
            try:
                job.result = await work(job)
                job.status = "succeeded"
            except Exception as exc:  # a failed job reports why; the server carries on
                log.exception("job %s failed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.time()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
