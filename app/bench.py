"""``persona-server bench``: an HTTP load generator for any OpenAI-compatible server.

Sends ``--requests`` chat completions, at most ``--concurrency`` at a time, each streamed so
time to first token and inter-token latency are measured as a client sees them. Output
lengths are fixed with ``ignore_eos`` (vLLM's extra, which this server shares) so runs
compare. Prints a table and, with ``--json``, the raw summary.

``run_prefill_probe`` measures what a long prompt arriving mid-generation does to the rows
already decoding (the chunked-prefill question); ``tests/bench/peers.py`` drives both against
this server and vLLM side by side.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

_WORDS = ("river stone lamp garden morning letter window music paper bridge winter harvest "
          "market signal candle forest engine ladder harbor meadow").split()


# The instruction sets that decide which of our kernels and dtypes a CPU runs fast (/proc/cpuinfo names).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def machine_kind(cpuinfo: str | None = None) -> dict:
    """The CPU a benchmark ran on, for its record: model name, the :data:`ISA_FLAGS` it has, and a
    short kind (``AVX512-BF16``, ``AVX-512``, ``AVX2`` or the architecture) that the docs' tables
    keep one row per. ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None).

    Example::

        machine_kind()  # {"cpu_model": "AMD EPYC", "isa": ["avx2", "avx512f", "avx512_bf16", ...], "kind": "AVX512-BF16"}
    """
    import platform
    from pathlib import Path

    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.is_file() else ""
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    kind = ("AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine())
    return {"cpu_model": fields.get("model name", platform.processor() or platform.machine()), "isa": isa, "kind": kind}


class BenchError(RuntimeError):
    """The server under test refused or broke a request the benchmark depends on."""


def steering_mix(i: int, vectors: list[str]) -> object:
    """A different steering config per request: none, one vector, two entries, other layers."""
    if not vectors:
        return None
    v = vectors[i % len(vectors)]
    choices = [
        None,
        {v: 1.0},
        {v: -1.5},
        [{"vector": v, "coefficient": 2.0, "layers": [12]}],
        [{"vector": v, "coefficient": 1.0, "layers": [15, 22]}, {"vector": vectors[(i + 1) % len(vectors)], "coefficient": -0.5}],
        [{"vector": v, "coefficient": 0.5 + 0.25 * (i % 5)}],
    ]
    return choices[i % len(choices)]


def make_prompt(i: int, words: int) -> str:
    """Prompt ``i`` of a workload: the same ``i`` always gives the same text.

    Example::

        make_prompt(0, 3)   # 'Write about ... .', 36 tokens with SmolLM2's chat template
    """
    rng = random.Random(i)
    return "Write about " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def long_prompt(seed: int, words: int) -> str:
    """A prompt of about ``words`` tokens (each listed word is one token for SmolLM2's tokenizer).

    Different seeds differ from the first word on, so a server's prefix cache cannot serve a
    repeated probe from memory.

    Example::

        long_prompt(1, 1950)   # about 2,000 prompt tokens once the chat template is added
    """
    rng = random.Random(f"long-{seed}")
    return "List again: " + " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class RequestResult:
    ok: bool
    status: int
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    # perf_counter() of every chunk that carried text, appended as it arrives.
    stamps: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    requests: int
    ok: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: dict
    itl_ms: dict
    latency_s: dict
    statuses: dict
    prompt_tokens_mean: float = 0.0


@dataclass
class PrefillProbe:
    """What one long prompt's prefill did to ``rows`` streams that were already decoding.

    ``before_itl_ms`` covers the rows' gaps between tokens once all of them were decoding and
    before the long prompt was sent; ``during_itl_ms`` every gap that overlaps the long
    prompt's wait for its first token. ``budget_ttft_ms`` is the idle time to first token of
    a prompt the size of one step's token budget: the cost of one full step.
    """

    rows: int
    long_prompt_tokens: int
    long_ttft_ms: float
    before_itl_ms: dict
    during_itl_ms: dict
    tokens_during: float
    budget_prompt_tokens: int
    budget_ttft_ms: float


def _pct(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p):
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * scale, 2)

    return {"mean": round(statistics.fmean(values) * scale, 2), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "max": round(ordered[-1] * scale, 2)}


async def _one(client: httpx.AsyncClient, body: dict, result: RequestResult | None = None) -> RequestResult:
    """Stream one chat completion into ``result``, which callers may watch while it fills."""
    result = result or RequestResult(ok=False, status=0)
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            result.error = (await response.aread()).decode(errors="replace")[:500]
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
                result.prompt_tokens = chunk["usage"]["prompt_tokens"]
            choice = (chunk.get("choices") or [None])[0]
            # A token that decodes to no text (a special token under ignore_eos) sends no content;
            # vLLM then carries it on the finishing chunk, which must still count as the first token.
            if choice and (choice["delta"].get("content") or (choice.get("finish_reason") and not result.stamps)):
                now = time.perf_counter()
                if result.stamps:
                    result.itl.append(now - result.stamps[-1])
                else:
                    result.ttft = now - start
                result.stamps.append(now)
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


def _body(model: str, content: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    }


async def served_model(client: httpx.AsyncClient) -> str:
    """The first model ``GET /v1/models`` lists: the name any OpenAI-compatible server accepts.

    Example::

        async with httpx.AsyncClient(base_url="http://127.0.0.1:8000") as c:
            await served_model(c)   # 'SmolLM2-135M-Instruct'
    """
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise BenchError(f"GET /v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


def _client(url: str, connections: int, api_key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers)


async def run_load(
    url: str,
    *,
    requests: int = 64,
    concurrency: int = 32,
    prompt_words: int = 16,
    max_tokens: int = 64,
    vectors: list[str] | None = None,
    api_key: str | None = None,
    model: str | None = None,
    first_prompt: int = 0,
) -> Summary:
    """Drive ``url`` and summarise; ``vectors`` turns on the mixed steering workload.

    ``model`` defaults to the first one the server lists; ``first_prompt`` shifts the prompt
    set, so repeated runs need not send texts a prefix cache has already seen.

    Example::

        summary = asyncio.run(run_load("http://127.0.0.1:8000", requests=32, concurrency=32,
                                       prompt_words=3, max_tokens=64))
        summary.output_tokens_per_s, summary.ttft_ms["p50"]
    """
    sem = asyncio.Semaphore(concurrency)
    async with _client(url, concurrency, api_key) as client:
        name = model or await served_model(client)

        async def guarded(i: int) -> RequestResult:
            body = _body(name, make_prompt(first_prompt + i, prompt_words), max_tokens)
            steering = steering_mix(i, vectors or [])
            if steering is not None:
                body["steering"] = steering
            async with sem:
                return await _one(client, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    statuses: dict = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    return Summary(
        requests=requests,
        ok=len(ok),
        duration_s=round(duration, 3),
        requests_per_s=round(len(ok) / duration, 3),
        output_tokens_per_s=round(sum(r.tokens for r in ok) / duration, 2),
        ttft_ms=_pct([r.ttft for r in ok], 1000),
        itl_ms=_pct([x for r in ok for x in r.itl], 1000),
        latency_s=_pct([r.latency for r in ok]),
        statuses=statuses,
        prompt_tokens_mean=round(statistics.fmean(r.prompt_tokens for r in ok), 1) if ok else 0.0,
    )


async def _wait_for(condition, rows: list[asyncio.Task], deadline: float, what: str) -> None:
    """Poll ``condition`` until it holds; a row that ended early or the deadline is an error."""
    while not condition():
        for task in rows:
            if task.done():
                r = task.result()
                raise BenchError(f"a decoding row ended while waiting for {what}: status {r.status} {r.error}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def run_prefill_probe(
    url: str,
    *,
    rows: int = 16,
    long_words: int = 1950,
    budget_words: int = 480,
    prompt_words: int = 3,
    warm_tokens: int = 8,
    row_max_tokens: int = 2048,
    first_prompt: int = 0,
    seed: int = 0,
    model: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 300,
) -> PrefillProbe:
    """``rows`` streams decode; then a ``long_words``-token prompt arrives. How long did they wait?

    First, on the idle server, prompts of about ``budget_words`` tokens measure the cost of a
    full step (the median of three). Then the rows start, and once every row has had
    ``warm_tokens`` tokens since the last of them started, the long prompt is sent (one output
    token). When every row has had two more tokens after the long prompt's first token, the
    rows are cancelled by closing their streams. The rows send prompts ``first_prompt``
    onwards (as ``run_load``); ``seed`` picks the long prompts.

    Example::

        probe = asyncio.run(run_prefill_probe("http://127.0.0.1:8000"))
        probe.during_itl_ms["max"], probe.before_itl_ms["p50"]
    """
    deadline = time.monotonic() + timeout_s
    async with _client(url, rows + 1, api_key) as client:
        name = model or await served_model(client)
        budgets = []
        for k in range(3):  # the median of three: one slow moment must not move the target
            budget = await _one(client, _body(name, long_prompt(seed * 10 + k + 1, budget_words), 1))
            if not budget.ok:
                raise BenchError(f"the token-budget prompt failed: status {budget.status} {budget.error}")
            budgets.append(budget.ttft)
        results = [RequestResult(ok=False, status=0) for _ in range(rows)]
        tasks = [asyncio.create_task(_one(client, _body(name, make_prompt(first_prompt + i, prompt_words),
                                                        row_max_tokens), r))
                 for i, r in enumerate(results)]
        try:
            await _wait_for(lambda: all(r.stamps for r in results), tasks, deadline, "every row's first token")
            all_decoding = max(r.stamps[0] for r in results)
            await _wait_for(lambda: all(sum(t > all_decoding for t in r.stamps) >= warm_tokens for r in results),
                            tasks, deadline, f"{warm_tokens} tokens on every row")
            sent = time.perf_counter()
            long = await _one(client, _body(name, long_prompt(seed * 10, long_words), 1))
            if not long.ok or not long.stamps:
                raise BenchError(f"the long prompt failed: status {long.status} {long.error or 'no token came back'}")
            first = sent + long.ttft
            seen = [len(r.stamps) for r in results]
            await _wait_for(lambda: all(len(r.stamps) >= n + 2 for r, n in zip(results, seen)),
                            tasks, deadline, "two tokens on every row after the long prompt's first")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    before, during, tokens_during = [], [], []
    for r in results:
        gaps = list(zip(r.stamps, r.stamps[1:]))
        before += [b - a for a, b in gaps if a >= all_decoding and b <= sent]
        during += [b - a for a, b in gaps if b > sent and a < first]
        tokens_during.append(sum(sent < t <= first for t in r.stamps))
    return PrefillProbe(
        rows=rows,
        long_prompt_tokens=long.prompt_tokens,
        long_ttft_ms=round(long.ttft * 1000, 2),
        before_itl_ms=_pct(before, 1000),
        during_itl_ms=_pct(during, 1000),
        tokens_during=statistics.median(tokens_during),
        budget_prompt_tokens=budget.prompt_tokens,
        budget_ttft_ms=round(statistics.median(budgets) * 1000, 2),
    )


def print_summary(s: Summary) -> None:
    print(f"requests          {s.ok}/{s.requests} ok in {s.duration_s:.2f} s  (statuses {s.statuses})")
    print(f"throughput        {s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:.1f} output tokens/s")
    for label, stats in (("TTFT (ms)", s.ttft_ms), ("ITL (ms)", s.itl_ms), ("latency (s)", s.latency_s)):
        if stats:
            print(f"{label:<17} mean {stats['mean']}  p50 {stats['p50']}  p90 {stats['p90']}  p99 {stats['p99']}")


def main(args) -> int:
    vectors = [v for v in (args.vectors or "").split(",") if v]
    if args.steering == "mixed" and not vectors:
        listing = httpx.get(f"{args.url}/v1/vectors", timeout=30,
                            headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
        if listing.status_code != 200:
            raise SystemExit(f"{args.url} has no vector registry (GET /v1/vectors: {listing.status_code}); "
                             "use --steering none for a server without steering")
        vectors = [v["id"] for v in listing.json()["data"]]
    summary = asyncio.run(run_load(
        args.url, requests=args.requests, concurrency=args.concurrency, prompt_words=args.prompt_words,
        max_tokens=args.max_tokens, vectors=vectors if args.steering == "mixed" else None, api_key=args.api_key,
    ))
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print_summary(summary)
    return 0 if summary.ok == summary.requests else 1
