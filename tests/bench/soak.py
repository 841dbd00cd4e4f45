"""``make soak``: does the server's memory stay flat under a long, varied load?

Starts ``persona-server serve`` (defaults) on a free loopback port and drives it for
``--minutes`` with waves that vary everything that allocates: short and ~1,000-token prompts,
mixed per-request steering, monitors switched on and off between waves, and streams the
client drops after a few tokens (cancellations). The server's resident set size (``VmRSS`` of
its process) is sampled every ``--sample-s`` seconds.

The verdict compares the median RSS of the first ``--window-min`` minutes after warm-up with
that of the last ones, and fits a line through every sample: a leak shows as growth between
the windows and a positive slope. Results go to ``tests/bench/soak.json`` and, between the
``soak`` markers, to docs/benchmarks.md.

    python -m tests.bench.soak --minutes 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.bench import BenchError, long_prompt, make_prompt, run_load
from steering.atomic import atomic_write_bytes
from steering.model import cpu_has_native_bf16
from tests.bench.peers import _exit_on_sigterm, our_server

ROOT = Path(__file__).resolve().parents[2]
START, END = "<!-- soak:start -->", "<!-- soak:end -->"
MONITORED = ("optimistic", "evil")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB, from ``/proc/PID/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"/proc/{pid}/status has no VmRSS line")


def slope_per_hour(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, MiB)`` samples, in MiB per hour.

    Example::

        slope_per_hour([(0, 100.0), (1800, 101.0), (3600, 102.0)])  # 2.0
    """
    if len(samples) < 2:
        raise ValueError("a slope needs at least two samples")
    ts, ys = [t for t, _ in samples], [y for _, y in samples]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    stt = sum((t - mt) ** 2 for t in ts)
    if stt == 0:
        raise ValueError("every sample has the same time")
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / stt * 3600


def verdict(samples: list[tuple[float, float]], window_s: float) -> dict:
    """Median RSS of the first and last ``window_s`` of ``samples``, their difference, the slope."""
    t0, t1 = samples[0][0], samples[-1][0]
    first = [y for t, y in samples if t <= t0 + window_s]
    last = [y for t, y in samples if t >= t1 - window_s]
    return {
        "first_window_mib": round(statistics.median(first), 1),
        "last_window_mib": round(statistics.median(last), 1),
        "growth_mib": round(statistics.median(last) - statistics.median(first), 1),
        "min_mib": round(min(y for _, y in samples), 1),
        "max_mib": round(max(y for _, y in samples), 1),
        "slope_mib_per_hour": round(slope_per_hour(samples), 1),
    }


async def _dropped_streams(url: str, model: str, n: int, first: int) -> int:
    """``n`` streamed requests whose client hangs up after three chunks; how many streamed at all."""
    streamed = 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int) -> None:
            nonlocal streamed
            body = {"model": model, "stream": True, "max_tokens": 64, "ignore_eos": True,
                    "messages": [{"role": "user", "content": make_prompt(first + i, 12)}]}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = 0
                async for _line in r.aiter_lines():
                    chunks += 1
                    if chunks == 3:
                        streamed += 1
                        return
        await asyncio.gather(*(one(i) for i in range(n)))
    return streamed


def _wave(url: str, model: str, vectors: list[str], wave: int) -> str:
    """One wave of the rotating load; a line for the log."""
    kind = wave % 4
    first = 1_000 * wave
    if kind == 0:
        s = asyncio.run(run_load(url, requests=24, concurrency=16, prompt_words=8, max_tokens=48, vectors=vectors,
                                 model=model, first_prompt=first))
    elif kind == 1:
        for vector in MONITORED:
            httpx.put(f"{url}/v1/monitors/{vector}", json={"mode": "annotate"}, timeout=30).raise_for_status()
        try:
            s = asyncio.run(run_load(url, requests=16, concurrency=8, prompt_words=40, max_tokens=32, model=model,
                                     first_prompt=first))
        finally:
            for vector in MONITORED:
                httpx.delete(f"{url}/v1/monitors/{vector}", timeout=30)
    elif kind == 2:
        body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": long_prompt(wave, 950)}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
        if r.status_code != 200:
            raise BenchError(f"a long prompt failed: {r.status_code} {r.text[:200]}")
        return f"long prompt: {r.json()['usage']['prompt_tokens']} tokens"
    else:
        dropped = asyncio.run(_dropped_streams(url, model, 12, first))
        return f"{dropped}/12 streams dropped by the client after 3 chunks"
    if s.ok != s.requests:
        raise BenchError(f"wave {wave}: {s.ok}/{s.requests} requests succeeded ({s.statuses})")
    return f"{s.requests} requests, {s.output_tokens_per_s:.0f} tok/s"


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    server = our_server("ours-default", workdir, env=dict(item.split("=", 1) for item in args.env))
    server.start()
    try:
        server.wait_ready(args.ready_timeout)
        url = server.url
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        vectors = [v["id"] for v in httpx.get(f"{url}/v1/vectors", timeout=30).json()["data"]]
        for wave in range(4):  # warm-up: every wave kind once, before the first sample counts
            _wave(url, model, vectors, 10_000 + wave)
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        start = time.monotonic()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((round(time.monotonic() - start, 1), round(rss_mib(server.proc.pid), 1)))
                stop.wait(args.sample_s)

        thread = threading.Thread(target=sampler, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60 * args.minutes
        wave = 0
        while time.monotonic() < deadline:
            line = _wave(url, model, vectors, wave)
            print(f"[{time.monotonic() - began:7.1f} s] wave {wave}: {line}; RSS {samples[-1][1]:.0f} MiB", flush=True)
            wave += 1
        stop.set()
        thread.join()
        samples.append((round(time.monotonic() - start, 1), round(rss_mib(server.proc.pid), 1)))
    finally:
        server.stop()
    return {
        "meta": {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                 "cpu": "AVX512-BF16, bfloat16" if cpu_has_native_bf16() else "no native bfloat16, float32",
                 "minutes": args.minutes, "waves": wave, "sample_s": args.sample_s, "window_min": args.window_min,
                 "note": args.note, "env": args.env},
        "verdict": verdict(samples, 60 * args.window_min),
        "samples": samples,
    }


def render_block(results: dict) -> str:
    v, m = results["verdict"], results["meta"]
    lines = [
        START,
        f"Measured {m['date']} ({m['cpu']}) by `make soak` ({m['minutes']:g} min, {m['waves']} waves, RSS sampled "
        f"every {m['sample_s']} s{'; ' + m['note'] if m['note'] else ''}):",
        "",
        "| RSS, median of the first "
        f"{m['window_min']} min | median of the last {m['window_min']} min | growth | min / max | slope of a line "
        "through every sample |",
        "|---|---|---|---|---|",
        f"| {v['first_window_mib']} MiB | {v['last_window_mib']} MiB | {v['growth_mib']:+} MiB | {v['min_mib']} / "
        f"{v['max_mib']} MiB | {v['slope_mib_per_hour']:+} MiB/hour |",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-s", type=float, default=10)
    parser.add_argument("--window-min", type=float, default=5, help="minutes in each of the compared windows")
    parser.add_argument("--ready-timeout", type=float, default=420)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "bench" / "soak.json")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--note", default="")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the server (repeatable), to trial a setting")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    text = args.page.read_text()
    if START not in text or END not in text:
        print(f"soak: {args.page} has no '{START}' ... '{END}' block", file=sys.stderr)
        return 2
    try:
        results = run(args)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    atomic_write_bytes(args.out, (json.dumps(results, indent=1) + "\n").encode())
    block = render_block(results)
    text = args.page.read_text()
    atomic_write_bytes(args.page, (text[:text.find(START)] + block + text[text.find(END) + len(END):]).encode())
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
