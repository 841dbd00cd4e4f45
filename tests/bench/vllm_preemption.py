"""Response monitors on a request vLLM preempts (vLLM's CPU build; not part of `make test`).

vLLM gets 4 usable KV blocks of 128 tokens and 64 tokens per step, so of two requests of 300
greedy tokens one is preempted and later recomputed from position 0 in chunks. Each request's
per-token response-monitor projections are compared with those of the same request run alone.
About 25 minutes on a busy two-core machine::

    .venv/bin/python -m tests.bench.vllm_preemption
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import torch

TOKENS = 300
LAYER = 20
PROMPTS = ("Tell me a long story about a lighthouse keeper.", "Write a long essay about rivers and the sea.")


def _few_blocks() -> None:
    """Make vLLM's engine arguments ask for 5 KV blocks (one is vLLM's null block): a cache this
    small is how preemption is reached without hours of load."""
    import vllm

    class FewBlocks(vllm.AsyncEngineArgs):
        def __init__(self, *args, **kwargs):
            kwargs["num_gpu_blocks_override"] = 5
            super().__init__(*args, **kwargs)

    vllm.AsyncEngineArgs = FewBlocks


def main() -> None:
    _few_blocks()
    from steering.engine import GenerationRequest, TokenOut
    from steering.model import load_model
    from steering.sampling import SamplingParams
    from steering.vllm_engine import VLLMEngine

    lm = load_model("default", dtype="float32", device="cpu", cache_dir=Path.home() / ".cache" / "persona-server",
                    weights=False)
    engine = VLLMEngine(lm, model_dir=Path(lm.model.name_or_path), max_batch_size=4, max_model_len=512,
                        max_num_batched_tokens=64, dtype="float32", prefix_caching=False)
    probe = torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    probe = probe / probe.norm(dim=1, keepdim=True)

    def request(text: str) -> GenerationRequest:
        return GenerationRequest(prompt_ids=lm.tokenizer(text).input_ids, response_probes={LAYER: probe},
                                 sampling=SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True))

    async def run(text: str) -> tuple[list[int], list[float | None]]:
        tokens, projections = [], []
        async for event in engine.generate(request(text)):
            if isinstance(event, TokenOut):
                tokens.append(event.token_id)
                projections.append(event.projections[LAYER][0] if event.projections else None)
        return tokens, projections

    async def measure() -> dict:
        await engine.astart()
        try:
            alone_b = await run(PROMPTS[1])
            together = await asyncio.gather(run(PROMPTS[0]), run(PROMPTS[1]))
            alone_a = await run(PROMPTS[0])
        finally:
            engine.shutdown()
        out = {}
        for name, (ref_tokens, ref), (tokens, got) in (("a", alone_a, together[0]), ("b", alone_b, together[1])):
            diffs = [abs(x - y) for x, y in zip(ref, got) if x is not None and y is not None]
            off = next((i for i, (x, y) in enumerate(zip(ref, got))
                        if x is None or y is None or abs(x - y) > 1e-3 * max(1.0, abs(x))), None)
            out[name] = {"tokens_equal": ref_tokens == tokens, "n": len(tokens),
                         "max_abs_diff": max(diffs) if diffs else None, "first_token_off_by_more_than_1e-3": off}
        return out

    started = time.monotonic()
    result = asyncio.run(measure())
    print(json.dumps(result), f"{time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
