"""Work beside chat (extraction, screening, assessment, calibration), with its limits.

Background work is a job: ``202`` with an id, then ``GET /v1/jobs/{id}``. Every job, and the
synchronous assessment and calibration calls too, counts toward a cap of concurrent work per
caller (per API key; per client address when no keys are configured) and runs under a
deadline: past it the work's task is cancelled, which cancels its queued and running engine
requests, and the job fails saying so. Finished jobs are kept for a TTL and up to a count;
a job's files on disk (its upload spool and its output) are deleted with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class JobLimitError(Exception):
    """The caller already runs as many jobs as it may."""

    def __init__(self, limit: int, retry_after: int):
        super().__init__(f"this caller already runs {limit} job(s), the most allowed at once; "
                         "retry when one has finished")
        self.retry_after = retry_after


class JobDeadlineError(Exception):
    """The work ran past its deadline and was cancelled."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the work ran past its deadline of {timeout_s:g} s and was cancelled")


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
    output: Path | None = None  # what GET /v1/jobs/{id}/output serves once the job succeeded
    files: list[Path] = field(default_factory=list)  # deleted with the job
    expires_at: float | None = None  # time.monotonic() past which a finished job is forgotten

    def view(self) -> dict:
        return {"id": self.id, "object": "job", "kind": self.kind, "status": self.status,
                "created": int(self.created), "finished": int(self.finished) if self.finished else None,
                "progress": {"done": self.progress, "total": self.total}, "result": self.result, "error": self.error}


class JobStore:
    """Jobs of this process; a job runs as a task on the server's event loop.

    Example::

        store = JobStore(Path("data/jobs"), max_per_owner=2, timeout_s=3600, ttl_s=86400, keep=256)
        job = store.submit("extract", work, owner="key:1a2b3c")   # work: async (Job) -> dict
        result = await store.run_inline("key:1a2b3c", calibrate)   # counted and bounded the same way
    """

    def __init__(self, output_dir: Path, *, max_per_owner: int = 2, timeout_s: float | None = 3600.0,
                 ttl_s: float = 86400.0, keep: int = 256, retry_after: int = 1):
        self.output_dir = Path(output_dir)
        self.max_per_owner, self.timeout_s, self.ttl_s, self.keep = max_per_owner, timeout_s, ttl_s, keep
        self.retry_after = retry_after
        self._jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._active: collections.Counter[str] = collections.Counter()
        self._sweep_stale_files()

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        return cls(settings.data_dir / "jobs", max_per_owner=settings.max_jobs_per_key, timeout_s=settings.job_timeout_s,
                   ttl_s=settings.job_ttl_s, keep=settings.max_jobs_kept, retry_after=settings.retry_after_s)

    def _sweep_stale_files(self) -> None:
        # Job records live in memory, so files an earlier process left are nobody's; only those
        # older than the TTL go, in case another server shares this data directory.
        if not self.output_dir.is_dir():
            return
        cutoff = time.time() - self.ttl_s
        for path in self.output_dir.iterdir():
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)

    def get(self, job_id: str) -> Job | None:
        self.prune()
        return self._jobs.get(job_id)

    def check_room(self, owner: str) -> None:
        """Raise :class:`JobLimitError` when ``owner`` may not start more work now."""
        if self._active[owner] >= self.max_per_owner:
            raise JobLimitError(self.max_per_owner, self.retry_after)

    def new_file(self, suffix: str) -> Path:
        """A fresh path in the jobs directory (for an upload spool, before its job exists)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        return self.output_dir / f"upload-{uuid.uuid4().hex}{suffix}"

    def submit(self, kind: str, work: Callable[[Job], Awaitable[dict]], *, owner: str, total: int | None = None,
               output_suffix: str | None = None, files: tuple[Path, ...] = ()) -> Job:
        """Start ``work`` as a job of ``owner``; :class:`JobLimitError` when ``owner`` is at its cap.

        With ``output_suffix`` the job gets ``job.output`` (and its ``.part`` sibling for
        writing) in the jobs directory; ``files`` are deleted with the job as well."""
        self.check_room(owner)
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", kind=kind, total=total, files=list(files))
        if output_suffix is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            job.output = self.output_dir / f"{job.id}{output_suffix}"
            job.files += [job.output, partial(job.output)]
        self._jobs[job.id] = job
        self._active[owner] += 1

        async def run() -> None:
            job.status = "running"
            try:
                job.result = await self._bounded(work(job))
                job.status = "succeeded"
            except asyncio.CancelledError:
                job.status, job.error = "failed", "the server shut down before the job finished"
                raise
            except Exception as exc:  # a failed job reports why; the server carries on
                if not isinstance(exc, JobDeadlineError):
                    log.exception("job %s failed", job.id)
                job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            finally:
                job.finished = time.time()
                self._release(owner)
                if job.status != "succeeded":
                    _delete(job.files)
                self._expire_later(job)
                self.prune()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.prune()
        return job

    async def run_inline(self, owner: str, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in the caller's request, counted toward ``owner``'s cap and bounded by
        the same deadline (:class:`JobDeadlineError`)."""
        self.check_room(owner)
        self._active[owner] += 1
        try:
            return await self._bounded(work())
        finally:
            self._release(owner)

    async def _bounded(self, work: Awaitable[T]) -> T:
        # On expiry the scope cancels this task: the cancellation reaches the engine requests
        # the work awaits, which leave the queue and the batch.
        scope = asyncio.timeout(self.timeout_s)
        try:
            async with scope:
                return await work
        except TimeoutError:
            if scope.expired():
                raise JobDeadlineError(self.timeout_s) from None
            raise

    def _release(self, owner: str) -> None:
        self._active[owner] -= 1
        if self._active[owner] <= 0:
            del self._active[owner]

    def _expire_later(self, job: Job) -> None:
        # Without later traffic nothing would call prune(): each finished job books its own expiry.
        def fire() -> None:
            self._timers.discard(handle)
            self.prune()

        job.expires_at = time.monotonic() + self.ttl_s
        handle = asyncio.get_running_loop().call_later(self.ttl_s + 0.01, fire)
        self._timers.add(handle)

    def prune(self) -> None:
        """Forget finished jobs past the TTL, then the oldest finished ones beyond ``keep``;
        their files go with them. Queued and running jobs are never dropped."""
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.expires_at is not None), key=lambda j: j.expires_at)
        for job in [j for j in finished if now >= j.expires_at]:
            self._forget(job)
        finished = [j for j in finished if j.id in self._jobs]
        for job in finished[: max(0, len(self._jobs) - self.keep)]:
            self._forget(job)

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        _delete(job.files)

    async def close(self) -> None:
        """Cancel every job, wait for them to stop, and delete every job's files."""
        for handle in self._timers:
            handle.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self._jobs.values()):
            self._forget(job)


def partial(path: Path) -> Path:
    """Where an output is written before it is complete (renamed into place at the end)."""
    return path.with_name(path.name + ".part")


def _delete(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
