"""``make adapters``, second step: what each shipped Big Five adapter does, beside the other two
ways to move the same factor (the Big Five fine-tuning paper's comparison).

A real server on the default model (its default dtype) serves the adapters under
``vectors/<model>/adapters/`` (``--lora-modules``, as a user would start it) and is called over
HTTP. Every held-out prompt (``vectors/finetune/bigfive/heldout.json``, in no training set) is
answered greedily, without a system prompt, under each condition of a factor:

- ``base``: the model as shipped;
- ``adapter +`` / ``adapter -``: the factor's high and low pole adapters (``model`` names them);
- ``steer +`` / ``steer -``: the factor's vector at its recommended layer, plus and minus the top
  of its working coefficient range (raw units), on every position;
- ``prompt +`` / ``prompt -``: the strongest system prompts of ``vectors/evidence.json`` for the
  pole (in-context prompting, written apart from the vectors' extraction data).

Per condition: the factor monitor's z-score at the last prompt token (what an adapter does to
the monitor reading before a token is generated: the Persona Vectors paper's finetuning shift
in z units), the answers' own mean z over their tokens (``response_means``), a reader's
projection (the base model without adapter, steering or system prompt reading the question and
the answer, mean z over the answer's tokens: the same ruler for every condition, which the
monitor's readings are not, since they are taken before the request's steering), the lexicon
score of ``vectors/evidence.json`` (trait words minus opposite words per 100 words), words per
answer, the share of answers with an exclamation mark and the share with any emoji (the paper saw
emoji after fine-tuning on data that had none). Optionally the ``/v1/assess`` Big Five inventory
per adapter. Writes ``docs/finetune/adapters.json`` and a table as ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from pathlib import Path

import httpx
import torch

from app.main import create_app
from app.settings import Settings
from steering.atomic import atomic_write_bytes
from steering.chat import chat_prompt_ids, text_ids
from steering.evidence import load_evidence
from steering.model import load_model
from steering.monitor import scalar_projection, z_score
from tests.bench.remediation_evidence import cpu_kind
from tests.conftest import CACHE_DIR, LiveServer

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "vectors" / "finetune" / "bigfive" / "heldout.json"
FACTORS = ("extraversion", "agreeableness")
# Emoji blocks of Unicode (pictographs, emoticons, transport, symbols and dingbats, flags) and the
# emoji presentation selector.
EMOJI = re.compile("[\U0001F1E6-\U0001F1FF\U0001F300-\U0001FAFF\u2600-\u27BF\u2B50\u2B55\uFE0F]")


def words(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9']+", text))


def repeats_a_sentence(text: str) -> bool:
    """A sentence said twice in one answer: the loop a too-strong push sends a small model into."""
    sentences = [s.strip() for s in re.split(r"[.!?]", text) if s.strip()]
    return len(set(sentences)) < len(sentences)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 3) if values else None


def conditions(factor: str, adapters: set[str], evidence, vector) -> list[dict]:
    """The requests' extra fields per condition (``model``, ``steering``, a system prompt)."""
    name, top = f"big5.{factor}", float(vector.coefficient_range[1])
    out = [{"label": "base"}]
    for sign, pole in (("+", "high"), ("-", "low")):
        adapter = f"big5-{factor}-{pole}"
        if adapter in adapters:
            out.append({"label": f"adapter {sign}", "model": adapter})
    for sign, coefficient in (("+", top), ("-", -top)):
        out.append({"label": f"steer {sign}", "steering": [{"vector": name, "coefficient": coefficient}]})
    for sign, level in (("+", 2), ("-", -2)):
        out.append({"label": f"prompt {sign}", "system": evidence.system[level]})
    return out


async def answer(c: httpx.AsyncClient, cond: dict, prompt: str, monitored: str, max_tokens: int) -> dict:
    messages = ([{"role": "system", "content": cond["system"]}] if "system" in cond else []) + [
        {"role": "user", "content": prompt}]
    body = {"model": cond.get("model", "default"), "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "monitor": {"return_scores": True}}
    if "steering" in cond:
        body["steering"] = cond["steering"]
    r = await c.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    data = r.json()
    monitor = data["persona_monitor"]
    return {"prompt": prompt, "text": data["choices"][0]["message"]["content"],
            "prompt_z": monitor["scores"][monitored]["z"], "prompt_projection": monitor["scores"][monitored]["projection"],
            "response_z": monitor.get("response_means", {}).get(monitored)}


@torch.no_grad()
def reader_z(lm, vector, prompt: str, text: str) -> float | None:
    """The base model's mean z over the answer's tokens, reading question and answer plainly."""
    layer = vector.recommended_layer
    head = chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": prompt}])
    tail = text_ids(lm.tokenizer, text)
    if not tail:
        return None
    ids = torch.tensor([head + tail])
    hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0, len(head):]
    projection = scalar_projection(hidden.float().mean(0), vector.direction(layer))
    return z_score(projection, float(vector.stats["neutral_mean"][layer]), float(vector.stats["neutral_std"][layer]))


def summarize(rows: list[dict], lexicon) -> dict:
    return {
        "n": len(rows),
        "prompt_z": _mean([r["prompt_z"] for r in rows]),
        "prompt_projection": _mean([r["prompt_projection"] for r in rows]),
        "response_z": _mean([r["response_z"] for r in rows]),
        "reader_z": _mean([r["reader_z"] for r in rows]),
        "lexicon": _mean([lexicon.score(r["text"]) for r in rows]),
        "words": _mean([words(r["text"]) for r in rows]),
        "exclamation_share": round(sum("!" in r["text"] for r in rows) / len(rows), 3),
        "emoji_share": round(sum(bool(EMOJI.search(r["text"])) for r in rows) / len(rows), 3),
        "repeat_share": round(sum(repeats_a_sentence(r["text"]) for r in rows) / len(rows), 3),
    }


async def run(args) -> dict:
    settings = Settings(cache_dir=CACHE_DIR)
    lm = load_model("default", cache_dir=CACHE_DIR)
    shipped = settings.shipped_vectors_dir / lm.name / "adapters"
    adapters = sorted(p.name for p in shipped.iterdir() if (p / "adapter_config.json").exists()) if shipped.exists() else []
    prompts = json.loads(HELDOUT.read_text())["prompts"][: args.prompts]
    evidence = load_evidence(ROOT / "vectors" / "evidence.json")
    factors = [f for f in args.factors.split(",") if f]
    started = time.monotonic()
    results, assessments = {}, {}
    with tempfile.TemporaryDirectory() as data:
        app = create_app(Settings(data_dir=Path(data), cache_dir=CACHE_DIR,
                                  lora_modules=[f"{a}={shipped / a}" for a in adapters]), lm=lm)
        with LiveServer(app) as live:
            registry = live.state.registry
            async with httpx.AsyncClient(base_url=live.url, timeout=3600) as c:
                watch = {"mode": "annotate", "response_threshold": 1e9}
                for f in factors:
                    (await c.put(f"/v1/monitors/big5.{f}", json=watch)).raise_for_status()
                for f in factors:
                    name = f"big5.{f}"
                    conds = conditions(f, set(adapters), evidence[name], registry.get(name))
                    answers = await asyncio.gather(*(asyncio.gather(*(answer(c, cond, p, name, args.max_tokens)
                                                                      for p in prompts)) for cond in conds))
                    results[f] = {"conditions": conds, "answers": dict(zip([cd["label"] for cd in conds], answers))}
                    print(f"{f}: answered {len(conds)} conditions x {len(prompts)} prompts "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
                if args.assess_repetitions:
                    for a in ["default"] + adapters:
                        r = await c.post("/v1/assess", json={"inventory": "big5", "model": a,
                                                             "repetitions": args.assess_repetitions})
                        r.raise_for_status()
                        assessments[a] = {f: r.json()["factors"][f] for f in FACTORS}
                        print(f"assess {a}: " + ", ".join(f"{f} {v['score']}" for f, v in assessments[a].items()), flush=True)
            vectors = {f: registry.get(f"big5.{f}") for f in factors}
    reader = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    table = {}
    for f in factors:
        lexicon = evidence[f"big5.{f}"].lexicon
        table[f] = {}
        for label, rows in results[f]["answers"].items():
            for row in rows:
                row["reader_z"] = reader_z(reader, vectors[f], row["prompt"], row["text"])
            table[f][label] = summarize(rows, lexicon)
        base = table[f]["base"]
        for label, row in table[f].items():
            row["prompt_z_shift"] = round(row["prompt_z"] - base["prompt_z"], 3)
            row["prompt_projection_shift"] = round(row["prompt_projection"] - base["prompt_projection"], 3)
    training = ROOT / "docs" / "finetune" / "adapters-training.json"
    return {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(), "model": lm.name,
            "dtype": str(lm.dtype).removeprefix("torch."), "prompts": len(prompts), "max_tokens": args.max_tokens,
            "seconds": round(time.monotonic() - started), "adapters": adapters,
            "layers": {f: vectors[f].recommended_layer for f in factors},
            "training": json.loads(training.read_text())["adapters"] if training.exists() else {},
            "table": table, "assess": assessments, "assess_repetitions": args.assess_repetitions,
            "answers": {f: results[f]["answers"] for f in factors},
            "conditions": {f: results[f]["conditions"] for f in factors}}


def markdown(record: dict) -> str:
    lines = [f"Latest `make adapters`: {record['date']}, {record['cpu']}, {record['model']} ({record['dtype']}), "
             f"{record['prompts']} held-out prompts, greedy answers of at most {record['max_tokens']} tokens; "
             f"{record['seconds']} s on a shared, loaded machine. z: the factor's monitor z-score at its recommended "
             "layer; Δ prompt: shift of the last prompt token's reading against base.",
             "",
             "| factor | condition | Δ prompt z | answers' z | reader z | lexicon /100 words | words | with ! | "
             "with emoji | repeating a sentence |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f, rows in record["table"].items():
        for label, row in rows.items():
            lines.append(f"| {f} | {label} | {row['prompt_z_shift']:+.2f} | {row['response_z']} | {row['reader_z']} | "
                         f"{row['lexicon']} | {row['words']} | {row['exclamation_share']:.0%} | {row['emoji_share']:.0%} | "
                         f"{row['repeat_share']:.0%} |")
    if record["assess"]:
        lines += ["", f"`/v1/assess` Big Five inventory ({record['assess_repetitions']} repetitions), factor score "
                  "(the expected answer on the 1-5 scale, reverse-keyed items flipped; 3 is the middle) and kappa:", "",
                  "| model | " + " | ".join(FACTORS) + " |", "|---|" + "---|" * len(FACTORS)]
        for model, factors in record["assess"].items():
            lines.append(f"| {model} | " + " | ".join(f"{factors[f]['score']} ({factors[f]['kappa']})" for f in FACTORS) + " |")
    lines += ["", "First answers per condition (held-out prompt 1):", ""]
    for f, answers in record["answers"].items():
        for label, rows in answers.items():
            text = rows[0]["text"].replace("\n", " ").replace("|", "/")
            lines.append(f"- {f}, {label}: {text[:220]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--factors", default=",".join(FACTORS))
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--assess-repetitions", type=int, default=3, help="0: no /v1/assess inventory")
    p.add_argument("--out", default=str(ROOT / "docs" / "finetune" / "adapters.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = asyncio.run(run(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())
    atomic_write_bytes(out.with_suffix(".md"), (markdown(record) + "\n").encode())
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
