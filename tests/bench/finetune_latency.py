"""Latency of a small chat request while the server fine-tunes, against idle (issue 29, point 3).

Starts the real server (``persona-server serve`` in its own process), times ``--requests`` small
greedy chat requests one after another while it is idle, again while a fine-tuning job trains
(from its first training step; the job is cancelled afterwards), and once more idle after the
job, so drift of the machine's other load shows. Prints and writes medians, p90 and the
training/idle ratio to ``docs/finetune/latency.json``.

    python -m tests.bench.finetune_latency --requests 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from steering.atomic import atomic_write_bytes
from tests.bench.finetune_evidence import ANSWERS, build_set
from tests.conftest import spawn_server

ROOT = Path(__file__).resolve().parents[2]
PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]


def summary(seconds: list[float]) -> dict:
    return {"requests": len(seconds), "median_s": round(statistics.median(seconds), 4), "p90_s": round(p90(seconds), 4),
            "mean_s": round(statistics.fmean(seconds), 4)}


def timed_chats(client: httpx.Client, count: int, max_tokens: int) -> tuple[list[float], int]:
    seconds, tokens = [], 0
    for _ in range(count):
        t0 = time.perf_counter()
        r = client.post("/v1/chat/completions", json={"model": "default", "messages": PROMPT, "temperature": 0,
                                                      "max_tokens": max_tokens})
        seconds.append(time.perf_counter() - t0)
        r.raise_for_status()
        tokens = r.json()["usage"]["completion_tokens"]
    return seconds, tokens


def training_steps(client: httpx.Client, job_id: str) -> int:
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    return sum(1 for e in events if e["type"] == "metrics")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--finetune-threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "finetune" / "latency.json"))
    args = p.parse_args(argv)

    items = json.loads(ANSWERS.read_text())["items"]
    rows = build_set(items, "evil", 1.0)
    data_dir = Path(tempfile.mkdtemp(prefix="ft-latency-"))
    proc, url = spawn_server(data_dir, PERSONA_FINETUNE_THREADS=str(args.finetune_threads))
    loads = {"start": os.getloadavg()[0]}
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            timed_chats(client, 2, args.max_tokens)  # warm-up
            idle, tokens = timed_chats(client, args.requests, args.max_tokens)
            file_id = client.post("/v1/files", files={"file": ("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            # Far more epochs than the measurement needs: the job is cancelled once it is done.
            job = client.post("/v1/fine_tuning/jobs", json={"model": "default", "training_file": file_id,
                                                            "hyperparameters": {"n_epochs": 50, "batch_size": 4}}).json()
            deadline = time.monotonic() + 600
            while training_steps(client, job["id"]) == 0:
                if time.monotonic() > deadline or client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] not in (
                        "validating_files", "queued", "running"):
                    raise SystemExit("the job did not reach its first training step")
                time.sleep(0.5)
            steps_before = training_steps(client, job["id"])
            loads["training"] = os.getloadavg()[0]
            training, _ = timed_chats(client, args.requests, args.max_tokens)
            steps_during = training_steps(client, job["id"]) - steps_before
            still = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"]
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            time.sleep(2)
            after, _ = timed_chats(client, args.requests, args.max_tokens)
            loads["end"] = os.getloadavg()[0]
    finally:
        proc.terminate()
        proc.wait(30)

    cpu = open("/proc/cpuinfo").read()
    record = {
        "machine": platform.machine(), "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in cpu,
        "load_average_1m": {k: round(v, 2) for k, v in loads.items()},
        "request": {"messages": PROMPT, "max_tokens": args.max_tokens, "completion_tokens": tokens},
        "finetune_threads": args.finetune_threads, "training_steps_during_measurement": steps_during,
        "job_still_running_at_end": still == "running",
        "idle_before": summary(idle), "training": summary(training), "idle_after": summary(after),
    }
    idle_all = idle + after
    record["ratio_training_to_idle"] = {
        "median": round(statistics.median(training) / statistics.median(idle_all), 3),
        "p90": round(p90(training) / p90(idle_all), 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
