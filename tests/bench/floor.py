"""Batch-1 decode against the memory floor (``make bench-floor``; not part of ``make test``).

A batch-1 decode step reads every weight once plus the KV cache of its context; on CPU those bytes
do not fit the caches, so ``bytes / bandwidth`` is the least a step can take. This measures:

- the machine's streaming read bandwidth: a 1 GiB float32 tensor summed repeatedly, with 1 and 2
  threads (median of 5 sums);
- the bytes a step reads: every linear weight at its stored width (int8 plus its float32 scales
  under ``--quantization int8``), the norms, one embedding row, and the KV cache at the decode's
  mean context;
- batch-1 greedy decode through the engine (no HTTP), unquantized and int8 interleaved, 3
  repetitions, in the dtype this machine serves by default and in float32: decode tok/s (after the
  first token), the int8/none ratio, and the median step as a multiple of the floor at the
  engine's small-step thread count.

Example::

    python -m tests.bench.floor --tokens 128 --repetitions 3 --out tests/bench/floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from steering.atomic import atomic_write_bytes
from steering.chat import chat_prompt_ids
from steering.engine import Engine, GenerationRequest, TokenOut
from steering.layers import AttentionShape, text_config
from steering.model import cpu_has_native_bf16, load_model
from steering.quant import QuantLinear
from steering.sampling import SamplingParams

PROMPT = "Tell me about the history of the bicycle, and how it changed the way people live and work."


def read_bandwidth(threads: int, gib: float = 1.0, repetitions: int = 5) -> float:
    """Streaming read bandwidth in GB/s (10^9 bytes): a ``gib`` GiB float32 tensor summed."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(int(gib * 2**30) // 4)
        data.sum()
        times = []
        for _ in range(repetitions):
            start = time.perf_counter()
            data.sum()
            times.append(time.perf_counter() - start)
        return data.numel() * 4 / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(before)


def step_bytes(lm, context: int) -> dict[str, int]:
    """Bytes a batch-1 decode step reads at ``context`` tokens: weights at their stored width and
    the KV cache (both halves, every layer)."""
    weights = 0
    for module in lm.model.modules():
        if isinstance(module, nn.Linear):
            weights += module.weight.numel() * module.weight.element_size()
            if isinstance(module, QuantLinear):
                weights += module.scale.numel() * module.scale.element_size()
            if module.bias is not None:
                weights += module.bias.numel() * module.bias.element_size()
    for name, param in lm.model.named_parameters():
        if "norm" in name:
            weights += param.numel() * param.element_size()
    embedding = lm.model.get_input_embeddings().weight
    weights += embedding.shape[1] * embedding.element_size()  # one row looked up
    shape = AttentionShape.of(text_config(lm.model.config))
    kv = 2 * lm.num_layers * shape.kv_heads * shape.head_dim * context * torch.empty(0, dtype=lm.dtype).element_size()
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def decode(engine: Engine, ids: list[int], tokens: int) -> list[float]:
    """Seconds between consecutive generated tokens of one greedy batch-1 request."""

    async def run() -> list[float]:
        stamps = []
        request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=tokens, temperature=0,
                                                                            ignore_eos=True))
        async for event in engine.generate(request):
            if isinstance(event, TokenOut):
                stamps.append(time.perf_counter())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    return asyncio.run(run())


def products_ms(engine: Engine, repetitions: int = 5) -> float:
    """Milliseconds the linear products of one batch-1 step take alone: every layer's fused
    products and the head, once each, in the step's order and with its thread count (the weights
    stream from memory as in a step); the rest of a step is attention, norms, steering, sampling
    and the engine's loop."""
    fused = engine.fused
    dtype = engine.lm.dtype
    hidden = torch.randn(1, engine.lm.hidden_size, dtype=dtype)
    inner = torch.randn(1, fused.layers[0].intermediate, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(engine.small_step_threads)
    try:
        times = []
        for _ in range(repetitions):
            start = time.perf_counter()
            for layer in fused.layers:
                layer.qkv.forward(hidden)
                layer.o.forward(hidden)
                layer.gate_up.forward(hidden)
                layer.down.forward(inner)
            fused.lm_head(hidden)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    finally:
        torch.set_num_threads(before)


def measure(dtype: str, tokens: int, repetitions: int, bandwidth: dict[int, float],
            small_step_threads: int | None = None) -> list[dict]:
    models = {q: load_model("default", dtype=dtype, device="cpu", quantization=q) for q in ("none", "int8")}
    engines = {}
    for q, lm in models.items():
        engines[q] = Engine(lm, max_batch_size=1, max_waiting=4, max_model_len=1024,
                            small_step_threads=small_step_threads)
        engines[q].start()
    try:
        ids = chat_prompt_ids(models["none"].tokenizer, [{"role": "user", "content": PROMPT}])
        for engine in engines.values():
            decode(engine, ids, 8)  # warm: first-use allocations, the RoPE table
        steps: dict[str, list[float]] = {q: [] for q in models}
        products: dict[str, list[float]] = {q: [] for q in models}
        for _ in range(repetitions):
            for q, engine in engines.items():  # interleaved: the machine's drift hits both alike
                gaps = decode(engine, ids, tokens)
                steps[q].append(statistics.median(gaps))
                products[q].append(products_ms(engine))
        rows = []
        for q, lm in models.items():
            threads = engines[q].small_step_threads
            nbytes = step_bytes(lm, len(ids) + tokens // 2)
            floor = nbytes["total"] / (bandwidth[min(threads, max(bandwidth))] * 1e9)
            step = statistics.median(steps[q])
            rows.append({"dtype": str(lm.dtype).removeprefix("torch."), "quantization": q, "threads": threads,
                         "tok_s": round(1 / step, 1), "tok_s_range": [round(1 / max(steps[q]), 1), round(1 / min(steps[q]), 1)],
                         "step_ms": round(step * 1e3, 2), "bytes": nbytes, "floor_ms": round(floor * 1e3, 2),
                         "x_floor": round(step / floor, 2), "products_ms": round(statistics.median(products[q]), 2)})
        rows[1]["ratio_to_none"] = round(rows[1]["tok_s"] / rows[0]["tok_s"], 2)
        return rows
    finally:
        for engine in engines.values():
            engine.shutdown()


def cpu_kind() -> dict:
    flags = Path("/proc/cpuinfo").read_text(errors="ignore") if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "")
    return {"model": model or platform.processor(), "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                                                            if f" {f}" in flags]}


def table(result: dict) -> str:
    lines = ["| dtype | weights | threads | tok/s (range) | int8/none | step ms | products alone ms | bytes/step MB "
             "| floor ms | x floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['dtype']} | {r['quantization']} | {r['threads']} | {r['tok_s']} ({r['tok_s_range'][0]}-"
                     f"{r['tok_s_range'][1]}) | {r.get('ratio_to_none', '')} | {r['step_ms']} | {r['products_ms']} | "
                     f"{r['bytes']['total'] / 1e6:.0f} | {r['floor_ms']} | {r['x_floor']} |")
    return "\n".join(lines)


def write_page(page: Path, result: dict) -> None:
    """Replace the block between the floor markers of ``page`` with ``result``'s table."""
    text = page.read_text()
    start, end = "<!-- floor:start -->", "<!-- floor:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    cpu = result["cpu"]
    block = (f"Measured {result['date']} on {cpu['model']} ({', '.join(cpu['isa'])}; {result['cores']} cores, load average "
             f"{' / '.join(result['load_before'])} before the run: a shared machine) by `make bench-floor`: batch-1 greedy "
             f"decode of {result['tokens']} tokens, {result['repetitions']} repetitions interleaved, medians (range of the "
             f"repetitions in brackets); read bandwidth {result['bandwidth_gb_s']['1']} GB/s with 1 thread, "
             f"{result['bandwidth_gb_s']['2']} GB/s with 2.\n\n{table(result)}\n")
    atomic_write_bytes(page, (head + start + "\n" + block + end + tail).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--dtypes", default=None, help="comma-separated (default: this machine's default, then float32)")
    parser.add_argument("--small-step-threads", type=int, help="the engine's threads for batch-1 steps (default: its own "
                        "choice, PERSONA_CPU_SMALL_STEP_THREADS)")
    parser.add_argument("--out", default="tests/bench/floor.json")
    parser.add_argument("--page", help="rewrite the table between the floor markers of this docs page")
    args = parser.parse_args(argv)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16", "float32"] if cpu_has_native_bf16() else ["float32"])
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]  # the machine is shared: say how busy it was
    bandwidth = {t: round(read_bandwidth(t), 2) for t in (1, 2)}
    print(f"read bandwidth GB/s: {bandwidth}", flush=True)
    rows = [row for dtype in dtypes
            for row in measure(dtype, args.tokens, args.repetitions, bandwidth, args.small_step_threads)]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_kind(), "cores": torch.get_num_threads(),
              "load_before": load, "bandwidth_gb_s": bandwidth, "tokens": args.tokens,
              "repetitions": args.repetitions, "rows": rows}
    result = json.loads(json.dumps(result))  # the bandwidth's keys as JSON has them
    atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
    if args.page:
        write_page(Path(args.page), result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
