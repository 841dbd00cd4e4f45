"""Fine-tuning jobs and their uploaded files: storage, the training process, persistence.

Files (``POST /v1/files``) live under ``<data_dir>/files`` as ``<id>.jsonl`` beside ``<id>.json``
(the OpenAI file object). A job lives under ``<data_dir>/fine_tuning/<id>/``: ``job.json`` (the
OpenAI job object, rewritten atomically at every change of state), ``events.jsonl``, the
child's ``train.log`` and, once trained, ``adapter/``. A job that was queued or running when
its server stopped is read back as failed, never lost and never silently resumed.

A job runs in three stages: the predicted shift of each monitored vector (screening the training
file through the serving engine, as ``POST /v1/screen`` does), training in a child process
(:mod:`steering.finetune`, a float32 copy of the model and its own threads, so serving goes on),
and registration of the adapter under ``fine_tuned_model`` in the adapter store. At most
``max_training_jobs`` train at once; the others wait as ``queued``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

from steering.atomic import atomic_write_bytes
from steering.finetune import Hyperparameters, MonitorSpec, PreventiveEntry, TrainingJob, prompts_of
from steering.runner import EngineRunner
from steering.screen import Screener, ScreenReport, jsonl_lines

log = logging.getLogger(__name__)
ACTIVE = ("validating_files", "queued", "running")
# Seconds a cancelled or timed-out child gets to stop by itself before it is killed.
_STOP_GRACE_S = 10.0


class FileStore:
    """Uploaded training files and their OpenAI file objects.

    Example::

        files = FileStore(Path("data/files"))
        obj = files.add(spool_path, filename="train.jsonl", purpose="fine-tune")
        files.path(obj["id"])     # data/files/file-....jsonl
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def add(self, spool: Path, *, filename: str, purpose: str) -> dict:
        """Move the checked upload ``spool`` into the store (renamed, never copied)."""
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        obj = {"id": file_id, "object": "file", "bytes": spool.stat().st_size, "created_at": int(time.time()),
               "filename": filename, "purpose": purpose, "status": "processed", "status_details": None}
        os.replace(spool, self.path(file_id))
        atomic_write_bytes(self.root / f"{file_id}.json", json.dumps(obj).encode())
        return obj

    def get(self, file_id: str) -> dict | None:
        if not file_id.startswith("file-") or "/" in file_id:
            return None
        meta = self.root / f"{file_id}.json"
        return json.loads(meta.read_text()) if meta.is_file() else None

    def spool(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f".upload-{uuid.uuid4().hex}.part"


def fine_tuned_name(suffix: str | None, job_id: str) -> str:
    """The adapter name a job's result is served under: ``ft-<suffix>-<8 hex of the job id>``."""
    tail = job_id.removeprefix("ftjob-")[:8]
    return f"ft-{suffix}-{tail}" if suffix else f"ft-{tail}"


class FineTuning:
    """The fine-tuning jobs of one server.

    Example::

        ft = FineTuning(state, app.state)
        job = ft.create(training_job, training_file_id="file-..", persona={...}, suffix="mine", ...)
        ft.cancel(job["id"])
    """

    def __init__(self, state, app_state):
        self.state, self.app_state = state, app_state
        self.settings = state.settings
        self.root = Path(self.settings.data_dir) / "fine_tuning"
        self.files = FileStore(Path(self.settings.data_dir) / "files")
        self._jobs: dict[str, dict] = {}
        self._events: dict[str, list[dict]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(self.settings.max_training_jobs)
        self._closing = False
        self._load()

    def _dir(self, job_id: str) -> Path:
        return self.root / job_id

    def _load(self) -> None:
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("ftjob-*/job.json")):
            try:
                job = json.loads(path.read_text())
            except (OSError, ValueError):
                log.warning("skipping unreadable fine-tuning job record %s", path)
                continue
            self._jobs[job["id"]] = job
            events = path.parent / "events.jsonl"
            self._events[job["id"]] = ([json.loads(line) for line in events.read_text().splitlines() if line.strip()]
                                       if events.is_file() else [])
            if job["status"] in ACTIVE:
                self._finish(job, "failed", error={"code": "server_restarted", "param": None,
                                                   "message": "the server stopped while this job was queued or running; "
                                                              "create the job again"})
        self.prune()

    def _save(self, job: dict) -> None:
        atomic_write_bytes(self._dir(job["id"]) / "job.json", json.dumps(job).encode())

    def event(self, job: dict, message: str, *, level: str = "info", data: dict | None = None,
              kind: str = "message") -> None:
        entry = {"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:20]}",
                 "created_at": int(time.time()), "level": level, "message": message, "data": data or {}, "type": kind}
        self._events.setdefault(job["id"], []).append(entry)
        with open(self._dir(job["id"]) / "events.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _finish(self, job: dict, status: str, *, error: dict | None = None) -> None:
        job["status"], job["finished_at"], job["error"] = status, int(time.time()), error
        self._save(job)
        message = {"succeeded": "The job has successfully completed", "cancelled": "The job was cancelled"}.get(
            status, f"The job failed: {(error or {}).get('message', '')}")
        self.event(job, message, level="error" if status == "failed" else "info")

    def get(self, job_id: str) -> dict | None:
        self.prune()
        return self._jobs.get(job_id)

    def list(self) -> list[dict]:
        self.prune()
        return sorted(self._jobs.values(), key=lambda j: j["created_at"], reverse=True)

    def events(self, job_id: str) -> list[dict]:
        """Newest first, as OpenAI lists them."""
        return list(reversed(self._events.get(job_id, [])))

    def prune(self) -> None:
        """Forget finished jobs older than the job TTL, with their files (the adapter stays served)."""
        cutoff = time.time() - self.settings.job_ttl_s
        for job in [j for j in self._jobs.values() if j["status"] not in ACTIVE and (j["finished_at"] or 0) < cutoff]:
            self._jobs.pop(job["id"], None)
            self._events.pop(job["id"], None)
            shutil.rmtree(self._dir(job["id"]), ignore_errors=True)

    def create(self, spec: TrainingJob, *, model: str, training_file: str, validation_file: str | None,
               suffix: str | None, persona: dict, monitor_vectors: list) -> dict:
        """Record a job whose inputs the caller has checked and start it; returns the job object.

        ``spec`` lacks the paths this store decides (output dir, vector files); ``monitor_vectors``
        are the resolved :class:`~steering.vector.PersonaVector` of ``persona["monitor"]`` plus
        those preventative steering uses."""
        job_id = f"ftjob-{uuid.uuid4().hex[:24]}"
        directory = self._dir(job_id)
        (directory / "vectors").mkdir(parents=True)
        for vector in monitor_vectors:
            path = directory / "vectors" / f"{vector.name}.safetensors"
            vector.save(path)
            spec.vector_files[vector.name] = str(path)
        spec.output_dir = str(directory / "adapter")
        hp = spec.hyperparameters
        job = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
            "model": model, "fine_tuned_model": None, "organization_id": "persona-server", "result_files": [],
            "status": "validating_files", "validation_file": validation_file, "training_file": training_file,
            "hyperparameters": {"n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                                "learning_rate_multiplier": hp.learning_rate_multiplier},
            "trained_tokens": None, "error": None, "seed": hp.seed, "estimated_finish": None, "integrations": [],
            "user_provided_suffix": suffix, "metadata": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": hp.n_epochs, "batch_size": hp.batch_size,
                "learning_rate_multiplier": hp.learning_rate_multiplier}}},
            "persona": persona, "persona_result": None,
        }
        atomic_write_bytes(directory / "spec.json", spec.to_json().encode())
        self._jobs[job_id] = job
        self._events[job_id] = []
        self._save(job)
        self.event(job, f"Created fine-tuning job: {job_id}")
        task = asyncio.get_running_loop().create_task(self._run(job, spec))
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._settle(job))
        return job

    def _settle(self, job: dict) -> None:
        # A task cancelled before its first step never ran _run's handlers: record the end here.
        self._tasks.pop(job["id"], None)
        if job["status"] in ACTIVE:
            if self._closing:
                self._finish(job, "failed", error={"code": "server_shutdown", "param": None,
                                                   "message": "the server shut down before the job finished"})
            else:
                self._finish(job, "cancelled")

    def cancel(self, job_id: str) -> dict | None:
        """Cancel a queued or running job (its child process is stopped); a finished one is left as it is."""
        job = self._jobs.get(job_id)
        task = self._tasks.get(job_id)
        if job is not None and task is not None and job["status"] in ACTIVE:
            task.cancel()
        return job

    async def wait(self, job_id: str) -> dict:
        task = self._tasks.get(job_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        return self._jobs[job_id]

    async def close(self) -> None:
        """Stop every job (each is recorded as failed: the server shut down) and wait for them."""
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, job: dict, spec: TrainingJob) -> None:
        try:
            job["status"] = "queued"
            self._save(job)
            async with self._slots:
                job["status"] = "running"
                self._save(job)
                self.event(job, "Fine-tuning job started")
                predicted = await self._predicted_shifts(job, spec)
                result = await self._train(job, spec)
                shifts = result.pop("shifts")
                job["persona_result"] = {"vectors": {
                    name: {"predicted_shift": predicted.get(name), **reading} for name, reading in shifts.items()},
                    "first_loss": result["first_loss"], "last_loss": result["last_loss"], "steps": result["steps"]}
                job["trained_tokens"] = result["trained_tokens"]
                job["fine_tuned_model"] = self._register(job, Path(spec.output_dir))
                self._finish(job, "succeeded")
        except asyncio.CancelledError:
            if self._closing:
                self._finish(job, "failed", error={"code": "server_shutdown", "param": None,
                                                   "message": "the server shut down before the job finished"})
            else:
                self._finish(job, "cancelled")
        except _JobFailed as exc:
            self._finish(job, "failed", error={"code": exc.code, "param": None, "message": str(exc)})
        except Exception as exc:  # a failed job says why; the server carries on
            log.exception("fine-tuning job %s failed", job["id"])
            self._finish(job, "failed", error={"code": "internal_error", "param": None,
                                               "message": f"{type(exc).__name__}: {exc}"})

    async def _predicted_shifts(self, job: dict, spec: TrainingJob) -> dict[str, float]:
        """Mean projection difference of the training file per monitored vector (the serving engine
        generates the model's own answers, as ``POST /v1/screen`` does)."""
        if not spec.monitor:
            return {}
        vectors = [self.state.registry.get(m.vector) for m in spec.monitor]
        layers = {m.vector: m.layer for m in spec.monitor}
        report = ScreenReport([v.name for v in vectors], top_k=1)
        screener = Screener(EngineRunner(self.state.engine), self.state.lm.tokenizer, vectors, layers=layers,
                            max_new_tokens=self.settings.finetune_screen_tokens, limit=self.state.prompt_limit)
        async for _row in screener.rows(jsonl_lines(spec.training_file), report):
            pass
        summary = report.summary(True)["vectors"]
        predicted = {name: summary[name]["mean_diff"] for name in summary}
        self.event(job, "Predicted shift from screening the training file: "
                   + ", ".join(f"{name} {value:+.3f}" for name, value in predicted.items()), data={"predicted_shift": predicted})
        return predicted

    async def _train(self, job: dict, spec: TrainingJob) -> dict:
        directory = self._dir(job["id"])
        threads = str(spec.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        with open(directory / "train.log", "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "steering.finetune", str(directory / "spec.json"),
                stdout=asyncio.subprocess.PIPE, stderr=log_file, env=env, start_new_session=True)
        result = failure = None
        try:
            async with asyncio.timeout(self.settings.finetune_timeout_s + 60 if self.settings.finetune_timeout_s else None):
                async for raw in proc.stdout:
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        continue
                    if event["type"] == "metrics":
                        data = {k: v for k, v in event.items() if k not in ("type", "created_at")}
                        self.event(job, f"Step {event['step']}/{event['total_steps']}: " + ", ".join(
                            f"{k} = {v:.4f}" for k, v in data.items() if k.endswith("_loss")), data=data, kind="metrics")
                    elif event["type"] == "message":
                        self.event(job, event["message"])
                    elif event["type"] == "result":
                        result = event["result"]
                    elif event["type"] == "error":
                        failure = event
                await proc.wait()
        except TimeoutError:
            await _stop(proc)
            raise _JobFailed("deadline", f"training ran past its deadline of {self.settings.finetune_timeout_s:g} s") from None
        except asyncio.CancelledError:
            await _stop(proc)
            raise
        if result is None:
            if failure is not None:
                raise _JobFailed(failure["code"], failure["message"])
            raise _JobFailed("training_failed", f"the training process exited with status {proc.returncode}; "
                                                "see its log in the job's directory")
        return result

    def _register(self, job: dict, adapter_dir: Path) -> str | None:
        """Serve the adapter at once under the job's ``fine_tuned_model`` name."""
        name = fine_tuned_name(job["user_provided_suffix"], job["id"])
        store_owner = self.app_state if getattr(self.app_state, "adapters", None) is not None else self.state
        if getattr(store_owner, "adapters", None) is None:
            self.event(job, "This server has no adapter store: the adapter stays in the job's directory", level="warn")
            return None
        from steering.adapters import register_adapter

        register_adapter(store_owner, name, adapter_dir)
        self.event(job, f"Serving the adapter as model '{name}'")
        return name


class _JobFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """Ask the training process to stop (it stops between steps), kill it if it does not."""
    if proc.returncode is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    except ProcessLookupError:
        pass


def eval_prompts(settings, vector_name: str, training_file: Path) -> list[str]:
    """The fixed prompts the finetuning shift is read on: the trait definition's held-out questions
    where the vector has a shipped definition, else the neutral prompts; any prompt of the training
    file is left out, so the shift is read on prompts the training never saw."""
    definition = settings.traits_dir / f"{vector_name}.json"
    prompts: list[str] = []
    if definition.is_file():
        prompts = list(json.loads(definition.read_text()).get("heldout_questions") or [])
    if not prompts:
        prompts = list(json.loads(settings.neutral_prompts_file.read_text())["prompts"])
    seen = prompts_of(training_file)
    return [p for p in prompts if p.strip() not in seen][:settings.finetune_eval_prompts]


def build_spec(settings, training_path: Path, validation_path: Path | None, hp: Hyperparameters,
               preventative: list[PreventiveEntry], monitor: list[MonitorSpec], max_tokens: int) -> TrainingJob:
    """The child's job description, less the paths the job store fills in."""
    threads = settings.finetune_threads or max(1, (os.cpu_count() or 2) // 2)
    deadline = time.time() + settings.finetune_timeout_s if settings.finetune_timeout_s else None
    return TrainingJob(
        model=settings.model, cache_dir=str(settings.cache_dir), training_file=str(training_path),
        validation_file=str(validation_path) if validation_path else None, output_dir="", hyperparameters=hp,
        preventative=preventative, monitor=monitor,
        eval_prompts={m.vector: eval_prompts(settings, m.vector, training_path) for m in monitor},
        max_tokens=max_tokens, threads=threads, deadline=deadline)
