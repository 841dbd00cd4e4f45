"""``persona-server bench``: an HTTP load generator for a running server.

Sends ``--requests`` chat completions, at most ``--concurrency`` at a time, each streamed so
time to first token and inter-token latency are measured as a client sees them. Output
lengths are fixed with ``ignore_eos`` so runs compare. Prints a table and, with ``--json``,
the raw summary.
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
    rng = random.Random(i)
    return "Write about " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


@dataclass
class RequestResult:
    ok: bool
    status: int
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)


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


def _pct(values: list[float], scale: float = 1.0) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def q(p):
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * scale, 2)

    return {"mean": round(statistics.fmean(values) * scale, 2), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


async def _one(client: httpx.AsyncClient, body: dict) -> RequestResult:
    start = time.perf_counter()
    last = None
    result = RequestResult(ok=False, status=0)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            await response.aread()
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
    result.latency = time.perf_counter() - start
    result.ok = True
    return result


async def run_load(
    url: str,
    *,
    requests: int = 64,
    concurrency: int = 32,
    prompt_words: int = 16,
    max_tokens: int = 64,
    vectors: list[str] | None = None,
    api_key: str | None = None,
) -> Summary:
    """Drive ``url`` and summarise; ``vectors`` turns on the mixed steering workload."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:

        async def guarded(i: int) -> RequestResult:
            body = {
                "model": "default",
                "messages": [{"role": "user", "content": make_prompt(i, prompt_words)}],
                "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
            }
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
                            headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}).json()
        vectors = [v["id"] for v in listing["data"]]
    summary = asyncio.run(run_load(
        args.url, requests=args.requests, concurrency=args.concurrency, prompt_words=args.prompt_words,
        max_tokens=args.max_tokens, vectors=vectors if args.steering == "mixed" else None, api_key=args.api_key,
    ))
    if args.json:
        print(json.dumps(asdict(summary)))
    else:
        print_summary(summary)
    return 0 if summary.ok == summary.requests else 1
