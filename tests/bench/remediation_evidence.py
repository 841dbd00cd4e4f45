"""``make remediation-evidence``: does a monitor's remediation steer eliciting prompts' answers
back toward the neutral level's, and leave the neutral ones alone?

A real server on the default model (its default dtype), called over HTTP as a client would. Per
vector, the evidence set's (``vectors/evidence.json``) neutral (0) and eliciting (+1, +2) system
prompts crossed with its questions are answered greedily twice: under an annotate-only monitor
(the plain answers), then under an enforced monitor whose remediation is the vector at minus the
top of its working coefficient range times a per-vector scale, on generated tokens, at its recommended layer. The
remediation threshold is the monitor's flag threshold calibrated on the server's built-in neutral
prompt set (``POST /v1/monitors/{vector}/calibrate``, ``--flag-rate``), never on these prompts.

Per level and run: the share of prompts remediated, the answers' own mean z-score at the
monitored layer (``persona_monitor.response_means``: the residual stream before the layer's
steering, so the remediation's own delta is not counted, only what it did to the states after),
and the lexicon score (trait words minus opposite words per 100 words). For neutral prompts that
were not remediated, whether each answer is token-identical to its plain one. Writes
``docs/evidence/remediation-<model>.json`` and a table as ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path

import httpx

from app.main import create_app
from app.settings import Settings
from steering.atomic import atomic_write_bytes
from steering.evidence import load_evidence
from steering.model import load_model
from tests.conftest import CACHE_DIR, LiveServer

ROOT = Path(__file__).resolve().parents[2]
LEVELS = (0, 1, 2)


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_bf16" if "avx512_bf16" in flags else ("avx2" if "avx2" in flags else platform.machine())


async def answer_all(c: httpx.AsyncClient, evidence, grid, max_tokens: int) -> list[dict]:
    async def one(level: int, question: str) -> dict:
        r = await c.post("/v1/chat/completions", json={
            "model": "default", "messages": evidence.messages(level, question), "max_tokens": max_tokens,
            "temperature": 0, "logprobs": True, "monitor": {"return_scores": True}})
        r.raise_for_status()
        body = r.json()
        choice, monitor = body["choices"][0], body["persona_monitor"]
        return {"level": level, "question": question, "text": choice["message"]["content"],
                "tokens": [t["token"] for t in choice["logprobs"]["content"]],
                "prompt_z": monitor["scores"][evidence.name]["score"],
                "action": monitor["scores"][evidence.name]["action"],
                "remediated": evidence.name in monitor.get("remediated", []),
                "response_z": monitor.get("response_means", {}).get(evidence.name),
                "lexicon": evidence.lexicon.score(choice["message"]["content"])}
    return await asyncio.gather(*(one(level, q) for level, q in grid))


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


async def measure(c: httpx.AsyncClient, evidence, vector, scale: float, args) -> dict:
    name = evidence.name
    coefficient = -float(vector.coefficient_range[1]) * scale
    cal = await c.post(f"/v1/monitors/{name}/calibrate", json={"target_flag_rate": args.flag_rate,
                                                                "target_block_rate": args.flag_rate, "apply": False})
    cal.raise_for_status()
    threshold = cal.json()["flag_threshold"]
    grid = [(level, q) for level in LEVELS for q in evidence.questions[:args.questions]]
    # A response threshold no answer reaches: the monitor then reports the answers' own mean score.
    watch = {"response_threshold": 1e9}
    (await c.put(f"/v1/monitors/{name}", json={"mode": "annotate", **watch})).raise_for_status()
    plain = await answer_all(c, evidence, grid, args.max_tokens)
    (await c.put(f"/v1/monitors/{name}", json={"mode": "enforce", "remediate_threshold": threshold, **watch,
                                               "remediation": [{"vector": name, "coefficient": coefficient}]})
     ).raise_for_status()
    remedied = await answer_all(c, evidence, grid, args.max_tokens)
    (await c.delete(f"/v1/monitors/{name}")).raise_for_status()

    per_level = {}
    for level in LEVELS:
        p = [a for a in plain if a["level"] == level]
        r = [a for a in remedied if a["level"] == level]
        per_level[str(level)] = {
            "n": len(p), "remediated": sum(a["remediated"] for a in r),
            "response_z_plain": _mean([a["response_z"] for a in p]), "response_z_remediated": _mean([a["response_z"] for a in r]),
            "lexicon_plain": _mean([a["lexicon"] for a in p]), "lexicon_remediated": _mean([a["lexicon"] for a in r]),
        }
    untouched = [(a, b) for a, b in zip(plain, remedied) if a["level"] == 0 and not b["remediated"]]
    per_level["0"]["unremediated_token_identical"] = f"{sum(a['tokens'] == b['tokens'] for a, b in untouched)}/{len(untouched)}"
    return {"vector": name, "layer": vector.recommended_layer, "coefficient": coefficient, "remediate_threshold_z": threshold,
            "per_level": per_level, "answers": {"plain": plain, "remediated": remedied}}


def markdown(record: dict) -> str:
    lines = [f"Latest `make remediation-evidence`: {record['date']}, {record['cpu']}, {record['model']} ({record['dtype']}), "
             f"{record['questions']} questions x levels 0, +1, +2, greedy answers of at most {record['max_tokens']} tokens, "
             f"plain then remediated; {record['seconds']:.0f} s in all.",
             "",
             "| vector | remediation (raw, layer) | threshold (z) | level | remediated | answer's z: plain -> remediated | "
             "lexicon /100 words: plain -> remediated |",
             "|---|---|---|---|---|---|---|"]
    for res in record["results"]:
        for level in LEVELS:
            row = res["per_level"][str(level)]
            extra = f" (unremediated token-identical {row['unremediated_token_identical']})" if level == 0 else ""
            lines.append(f"| `{res['vector']}` | {res['coefficient']:g} @ {res['layer']} | {res['remediate_threshold_z']:.2f} | "
                         f"{level:+d} | {row['remediated']}/{row['n']}{extra} | {row['response_z_plain']} -> "
                         f"{row['response_z_remediated']} | {row['lexicon_plain']} -> {row['lexicon_remediated']} |")
    return "\n".join(lines)


async def run(args) -> dict:
    lm = load_model("default", cache_dir=CACHE_DIR)
    evidence = load_evidence(ROOT / "vectors" / "evidence.json")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as data, LiveServer(create_app(Settings(data_dir=Path(data), cache_dir=CACHE_DIR),
                                                                      lm=lm)) as live:
        async with httpx.AsyncClient(base_url=live.url, timeout=1800) as c:
            results = []
            for spec in args.vectors.split(","):
                name, _, scale = spec.partition(":")
                results.append(await measure(c, evidence[name], live.state.registry.get(name), float(scale or 1), args))
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(), "model": lm.name, "dtype": str(lm.dtype).removeprefix("torch."),
            "questions": args.questions, "max_tokens": args.max_tokens, "flag_rate": args.flag_rate,
            "seconds": time.monotonic() - started, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    # humorous at the top of its range (6 raw) took the answers' z as far below the neutral level's
    # as the eliciting prompts' sat above it, and 3 still 1.3 below (runs of 2026-12-06): 0.4 of it.
    p.add_argument("--vectors", default="evil:1,humorous:0.4",
                   help="VECTOR:SCALE,...: remediation = -SCALE x the top of the vector's coefficient range")
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--flag-rate", type=float, default=0.05, help="target flag rate on the built-in neutral prompts")
    p.add_argument("--out", default=None, help="default: docs/evidence/remediation-<model>.json")
    args = p.parse_args(argv)
    record = asyncio.run(run(args))
    out = Path(args.out or ROOT / "docs" / "evidence" / f"remediation-{record['model']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(record, indent=1).encode())
    atomic_write_bytes(out.with_suffix(".md"), (markdown(record) + "\n").encode())
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
