"""What ``--quantization int8`` does to the default model's outputs, per dtype (not part of ``make
test``; ``tests/test_quantization.py`` holds the float32 bounds):

- the first 16 greedy tokens of the 64 evidence questions (``vectors/evidence.json``), equal to the
  unquantized model's in the same dtype (and, for scale, bfloat16 against float32 unquantized);
- perplexity of the 120 neutral prompts (``vectors/neutral_prompts.json``), read teacher-forced;
- the last prompt token's projection on the shipped ``optimistic`` vector at its layer, what a
  monitor reads, over 40 questions: the largest difference, in standard deviations across them;
- the answers' projection under steering at -2..+2 on 8 questions.

Example::

    python -m tests.bench.quantization_quality --out tests/bench/quantization_quality.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch

from steering.atomic import atomic_write_bytes
from steering.chat import chat_prompt_ids, text_ids
from steering.engine import Engine
from steering.extract import coefficient_sweep, unit_rows
from steering.model import cpu_has_native_bf16, load_model
from steering.runner import EngineRunner
from steering.vector import PersonaVector

VECTORS = Path(__file__).resolve().parents[2] / "vectors"


def readings(dtype: str, quantization: str) -> dict:
    lm = load_model("default", dtype=dtype, device="cpu", quantization=quantization)
    evidence = json.loads((VECTORS / "evidence.json").read_text())
    questions = [q for group in evidence["questions"].values() for q in group]
    neutral = json.loads((VECTORS / "neutral_prompts.json").read_text())["prompts"]
    vector = PersonaVector.load(VECTORS / lm.name / "optimistic.safetensors")
    layer = vector.recommended_layer
    engine = Engine(lm, max_batch_size=32, max_waiting=4096)
    engine.start()
    try:
        runner = EngineRunner(engine)
        prompts = [chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": q}]) for q in questions]
        answers = asyncio.run(runner.generate(prompts, max_new_tokens=16))
        texts = [text_ids(lm.tokenizer, t) for t in neutral]
        rows = asyncio.run(runner.token_logprobs(texts, [1] * len(texts)))
        perplexity = float(torch.tensor([v for row in rows for v in row]).mean().neg().exp())
        states = asyncio.run(runner.last_states(prompts[:40], [layer])).reshape(40, -1).float()
        sweep = asyncio.run(coefficient_sweep(runner, lm.tokenizer, vector.directions, layer, questions[:8],
                                              grid=(1.0, 2.0)))
    finally:
        engine.shutdown()
    return {"answers": answers, "perplexity": perplexity,
            "projections": (states @ unit_rows(vector.directions)[layer]).tolist(),
            "sweep": [row["projection"] for row in sweep]}


def compare(base: dict, other: dict) -> dict:
    equal = sum(a == b for a, b in zip(base["answers"], other["answers"]))
    p0, p1 = torch.tensor(base["projections"]), torch.tensor(other["projections"])
    return {"greedy16_equal": f"{equal}/{len(base['answers'])}",
            "perplexity_ratio": round(other["perplexity"] / base["perplexity"], 4),
            "monitor_max_diff_std": round(float((p1 - p0).abs().max() / p0.std()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/bench/quantization_quality.json")
    args = parser.parse_args(argv)
    dtypes = ["bfloat16", "float32"] if cpu_has_native_bf16() else ["float32"]
    runs = {(d, q): readings(d, q) for d in dtypes for q in ("none", "int8")}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    for d in dtypes:
        row = {"dtype": d, "against": f"{d} unquantized", **compare(runs[(d, "none")], runs[(d, "int8")]),
               "perplexity": round(runs[(d, "int8")]["perplexity"], 3),
               "perplexity_none": round(runs[(d, "none")]["perplexity"], 3),
               "sweep_none": runs[(d, "none")]["sweep"], "sweep_int8": runs[(d, "int8")]["sweep"]}
        result["rows"].append(row)
    if "bfloat16" in dtypes:
        result["rows"].append({"dtype": "bfloat16 unquantized", "against": "float32 unquantized",
                               **compare(runs[("float32", "none")], runs[("bfloat16", "none")])})
    atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())
    for row in result["rows"]:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
