"""``make finetune-evidence``: fine-tune the default model on this project's training sets and set
the predicted shift (screening), the measured finetuning shift and the change in expression side by
side, per dataset and vector, with r across datasets; then preventative steering at several
coefficients, and steering the un-prevented adapter at inference instead (the paper's comparison).
Results go to ``docs/finetune/evidence.json`` (rewritten after every run, so a stopped sweep keeps
what it measured) and a table beside it as ``.md``. A later sweep with the same training settings
keeps the runs already there and adds only the missing ones, so the sweeps of several sittings
make one table and one r.

The sets come from ``vectors/finetune/answers.json`` (written for this project): the same questions
with a plain answer and one answer per trait; a set of strength s answers a share s of the
questions (a fixed seeded choice) with the trait's answer and the rest plainly; strength 0 is the
neutral control. The last ``--heldout`` questions are never trained on: the loss on their plain
answers is the general-ability reading (held-out perplexity).

Inference steering adds ``coefficient * v[layer]`` to every token of the fine-tuned model (the same
hook preventative steering trains under); its answers are generated steered and read unsteered by
the same fine-tuned model, so the expression reading is of the text, not of the added vector. Its
measured shift is read steered: the state after the steered block, the added vector included.

Expression is read two ways from the same greedy answers: ``expression`` (their own projection on
the vector) and ``words`` (the mean lexicon score ``make evidence`` uses: the vector's trait words
minus its opposite words per 100 words, lexicons from ``evidence.json`` beside the vectors, so
``--vectors-dir`` pins them too); ``*_change`` is against the base model's. Runs recorded before
``words`` existed carry no ``words``: they still merge, show "—" in the table and are left out of
the words r (which says over how many datasets it ran). ``--redo LABEL`` (repeatable; ``base``
redoes the base reading) measures a kept run again in its place, so old runs gain the field
without a fresh table; a kept base without ``words`` gains them by itself (its answers are
generated again; its projection is kept, so the kept runs' expression changes stay comparable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from app.settings import Settings
from steering.chat import chat_prompt_ids, text_ids
from steering.engine import Engine
from steering.evidence import Lexicon, load_evidence
from steering.atomic import atomic_write_bytes
from steering.finetune import (
    Hyperparameters,
    MonitorSpec,
    PreventiveEntry,
    TrainingJob,
    last_prompt_states,
    preventative_deltas,
    preventative_steering,
    train,
)
from steering.model import load_model
from steering.registry import VectorRegistry
from steering.runner import EngineRunner
from steering.screen import Screener, ScreenReport

ROOT = Path(__file__).resolve().parents[2]
ANSWERS = ROOT / "vectors" / "finetune" / "answers.json"
# The settings a kept run must share with this sweep to stand in the same table and r.
SAME_SWEEP = ("traits", "epochs", "batch_size", "lr_multiplier", "heldout", "eval_prompts", "max_new_tokens")


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return round(sxy / math.sqrt(sxx * syy), 3) if sxx > 0 and syy > 0 else None


def build_set(items: list[dict], trait: str | None, strength: float, seed: int = 0) -> list[dict]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    laden = set(order[: round(strength * len(items))]) if trait else set()
    return [{"messages": [{"role": "user", "content": it["q"]},
                          {"role": "assistant", "content": it[trait] if i in laden else it["plain"]}]}
            for i, it in enumerate(items)]


def eval_questions(traits_dir: Path, trait: str, items: list[dict], count: int) -> list[str]:
    """The trait definition's held-out questions that no set holds, the first ``count``."""
    seen = {it["q"] for it in items}
    return [q for q in json.loads((traits_dir / f"{trait}.json").read_text())["heldout_questions"] if q not in seen][:count]


@torch.no_grad()
def expression(model, tok, prompts: list[str], unit: torch.Tensor, layer: int, max_new_tokens: int,
               steered=contextlib.nullcontext) -> tuple[float, list[str]]:
    """Mean projection of greedy answers' response-token states (the answers' own trait reading),
    and the answers' texts; the answers are generated inside ``steered()`` and read outside it."""
    values, answers = [], []
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": prompt}])])
        with steered():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        if out.shape[1] == ids.shape[1]:
            continue
        hidden = model(input_ids=out, output_hidden_states=True).hidden_states[layer][0, ids.shape[1]:]
        values.append(float(hidden.float().mean(0) @ unit))
    return sum(values) / len(values), answers


def words(lexicon: Lexicon, answers: list[str]) -> float:
    """Mean lexicon score of the answers (an empty answer scores 0, as in ``make evidence``)."""
    return round(sum(lexicon.score(a) for a in answers) / len(answers), 4)


@torch.no_grad()
def heldout_perplexity(model, tok, items: list[dict]) -> float:
    total, count = 0.0, 0
    for it in items:
        prompt = chat_prompt_ids(tok, [{"role": "user", "content": it["q"]}])
        answer = text_ids(tok, it["plain"])
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        loss = model(input_ids=ids, labels=labels).loss
        total, count = total + float(loss) * len(answer), count + len(answer)
    return round(math.exp(total / count), 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--traits", default="evil,sycophantic,hallucinating,impolite")
    p.add_argument("--strengths", default="0.25,0.5,1.0")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr-multiplier", type=float, default=2.0)
    p.add_argument("--heldout", type=int, default=6)
    p.add_argument("--eval-prompts", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preventative", default="evil:5@single,evil:2@all,evil:10@single,evil:1@all",
                   help="VECTOR:COEFFICIENT@single|all runs on the vector's 100%% set; empty: none")
    p.add_argument("--inference", default="evil:-0.5@single,evil:-1@single,evil:-2@single,evil:-1@all",
                   help="VECTOR:COEFFICIENT@single|all: steer the adapter of the vector's 100%% set at inference")
    p.add_argument("--long", default="evil:2", help="TRAIT:EPOCHS: the trait's 100%% set trained that long too")
    p.add_argument("--vectors-dir", default=None,
                   help="a vectors tree (<model>/*.safetensors, traits/*.json) instead of the shipped one")
    p.add_argument("--fresh", action="store_true", help="start a new table instead of adding to the one at --out")
    p.add_argument("--redo", action="append", default=[], metavar="LABEL",
                   help="measure this kept run again (its label, e.g. 'evil 100%%'; 'base': the base reading); repeatable")
    p.add_argument("--reverse", action="store_true",
                   help="train the strength sets last trait first, so a second sweep beside this one meets it midway")
    p.add_argument("--out", default=str(ROOT / "docs" / "finetune" / "evidence.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    settings = Settings(**({"shipped_vectors_dir": Path(args.vectors_dir), "traits_dir": Path(args.vectors_dir) / "traits"}
                           if args.vectors_dir else {}))
    data = json.loads(ANSWERS.read_text())
    items, heldout = data["items"][: -args.heldout], data["items"][-args.heldout:]
    traits = [t for t in args.traits.split(",") if t]
    serving = load_model("default", dtype="float32", device="cpu", cache_dir=settings.cache_dir)
    registry = VectorRegistry(Path(tempfile.mkdtemp()) / "vectors", model_name=serving.name,
                              fingerprint=serving.fingerprint, num_layers=serving.num_layers,
                              hidden_size=serving.hidden_size)
    registry.seed_from(settings.shipped_vectors_dir)
    vectors = {t: registry.get(t) for t in traits}
    layers = {t: v.recommended_layer for t, v in vectors.items()}
    units = {t: v.direction(layers[t]) / v.direction(layers[t]).norm() for t, v in vectors.items()}
    prompts = {t: eval_questions(settings.traits_dir, t, data["items"], args.eval_prompts) for t in traits}
    evidence = load_evidence((Path(args.vectors_dir) if args.vectors_dir else settings.assets_dir) / "evidence.json")
    lexicons = {t: evidence[t].lexicon for t in traits}
    engine = Engine(serving, max_batch_size=32, max_waiting=1 << 20)
    engine.start()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": serving.name, "machine": platform.machine(), "hyperparameters": vars(args), "runs": []}
    kept = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
    if kept and all(kept["hyperparameters"].get(k) == getattr(args, k) for k in SAME_SWEEP):
        record["base"], record["runs"] = kept["base"], kept["runs"]
        print(f"keeping {len(record['runs'])} runs of {out}", flush=True)
    redo = set(args.redo)
    done = {r["run"] for r in record["runs"]} - redo
    mine: set[str] = set()

    fresh = lambda: load_model("default", dtype="float32", device="cpu", cache_dir=settings.cache_dir,  # noqa: E731
                               prepack=False, cpu_kernels=False)
    if "base" not in record or "base" in redo or "words" not in record["base"]:
        base = fresh()
        readings = {t: expression(base.model, base.tokenizer, prompts[t], units[t], layers[t], args.max_new_tokens)
                    for t in traits}
        projections = {t: round(readings[t][0], 4) for t in traits}
        if "base" in record and "base" not in redo:
            # Only the words are new: the kept projection stays, the kept runs' changes are against it.
            print(f"base words added; projection now {projections}, kept {record['base']['expression']}", flush=True)
            projections = record["base"]["expression"]
        record["base"] = {"heldout_perplexity": heldout_perplexity(base.model, base.tokenizer, heldout),
                          "expression": projections,
                          "words": {t: words(lexicons[t], readings[t][1]) for t in traits}}
        del base

    def predicted(rows: list[dict]) -> dict[str, float]:
        report = ScreenReport(traits, 1)
        screener = Screener(EngineRunner(engine), serving.tokenizer, list(vectors.values()), layers=layers,
                            max_new_tokens=settings.finetune_screen_tokens)

        async def go() -> None:
            async for _row in screener.rows([(i + 1, json.dumps(r)) for i, r in enumerate(rows)], report):
                pass

        asyncio.run(go())
        return {t: v["mean_diff"] for t, v in report.summary(True)["vectors"].items()}

    def labels_on_disk() -> set[str]:
        return {r["run"] for r in json.loads(out.read_text())["runs"]} if out.is_file() and not args.fresh else set()

    def save(row: dict) -> None:
        # A redone run takes its old copy's place.
        kept_at = [i for i, r in enumerate(record["runs"]) if r["run"] == row["run"]]
        if kept_at:
            record["runs"][kept_at[0]] = row
        else:
            record["runs"].append(row)
        mine.add(row["run"])
        # Another sweep of the same settings may have added or amended runs since: the file's copy
        # of a run wins unless this sweep measured it.
        on_disk = json.loads(out.read_text()) if out.is_file() and not args.fresh else None
        if on_disk and all(on_disk["hyperparameters"].get(k) == getattr(args, k) for k in SAME_SWEEP):
            record["runs"] = merge_runs(on_disk["runs"], record["runs"], mine)
        record["correlations"] = correlations(record["runs"], traits)
        atomic_write_bytes(out, (json.dumps(record, indent=1) + "\n").encode())
        atomic_write_bytes(out.with_suffix(".md"), (table(record, traits) + "\n").encode())
        print(f"{row['run']}: " + ", ".join(f"{t} pred {v['predicted_shift']:+.2f} meas {v['measured_shift']:+.2f} "
                                            f"expr {v['expression_change']:+.2f} words {v['words_change']:+.2f}"
                                            for t, v in row["vectors"].items())
              + f", ppl {row['heldout_perplexity']} ({row['seconds']} s)", flush=True)

    def run(label: str, rows: list[dict], preventative: list[PreventiveEntry], *, epochs: int | None = None,
            kind: str = "plain", inference: list[tuple[str, PreventiveEntry]] = ()) -> None:
        """One fine-tune and its row; with ``inference``, also a row per (label, entry) steering
        the resulting adapter at inference."""
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "train.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            pred = predicted(rows)
            lm = fresh()
            job = TrainingJob(model="default", training_file=str(path), output_dir=str(Path(tmp) / "adapter"),
                              cache_dir=str(settings.cache_dir),
                              hyperparameters=Hyperparameters(epochs or args.epochs, args.batch_size,
                                                              args.lr_multiplier, 0),
                              preventative=preventative,
                              vector_files={t: str(settings.shipped_vectors_dir / serving.name / f"{t}.safetensors")
                                            for t in traits},
                              monitor=[MonitorSpec(t, layers[t]) for t in traits], eval_prompts=prompts,
                              threads=args.threads)
            result = train(job, lm=lm)
        common = {"epochs": epochs or args.epochs, "first_loss": result["first_loss"], "last_loss": result["last_loss"]}

        def reading(steered_entry: PreventiveEntry | None) -> dict:
            deltas = preventative_deltas([steered_entry], vectors, lm.num_layers) if steered_entry else {}
            steered = lambda: preventative_steering(lm.blocks, deltas)  # noqa: E731
            with steered():
                ppl = heldout_perplexity(lm.model, lm.tokenizer, heldout)
            readings = {}
            for t in traits:
                if steered_entry is None:
                    shift = result["shifts"][t]["measured_shift"]
                else:
                    with steered():
                        states = last_prompt_states(lm.model, lm.tokenizer, prompts[t], [layers[t]])[layers[t]]
                    # hidden_states[l] is recorded before block l's forward hooks: add what the hook
                    # adds there, so the reading is the state the next block receives.
                    if layers[t] in deltas:
                        states = states + deltas[layers[t]]
                    shift = round(float((states @ units[t]).mean()) - result["shifts"][t]["base_projection"], 4)
                expr, answers = expression(lm.model, lm.tokenizer, prompts[t], units[t], layers[t], args.max_new_tokens,
                                           steered)
                said = words(lexicons[t], answers)
                readings[t] = {"predicted_shift": pred[t], "measured_shift": shift, "expression": round(expr, 4),
                               "expression_change": round(expr - record["base"]["expression"][t], 4),
                               "words": said, "words_change": round(said - record["base"]["words"][t], 4)}
            return {"heldout_perplexity": ppl, "vectors": readings}

        if label not in done:
            save({"run": label, "kind": kind, "preventative": [vars(e) for e in preventative], **common,
                  **reading(None), "seconds": round(time.monotonic() - t0)})
        for steered_label, entry in inference:
            t1 = time.monotonic()
            save({"run": steered_label, "kind": "inference", "preventative": [], "inference_steering": [vars(entry)],
                  "shift_includes_hook": True, **common, **reading(entry), "seconds": round(time.monotonic() - t1)})

    def entry_of(spec: str) -> tuple[PreventiveEntry, str, str]:
        name, _, rest = spec.partition(":")
        coef, _, where = rest.partition("@")
        return PreventiveEntry(name, float(coef), "all" if where == "all" else [layers[name]]), coef, where

    try:
        if "neutral" not in done:
            run("neutral", build_set(items, None, 0.0), [])
        sets = [(t, float(x)) for t in traits for x in args.strengths.split(",") if x]
        for t, s in reversed(sets) if args.reverse else sets:
            # Read again before each run: a sweep beside this one may have trained the set meanwhile.
            if f"{t} {int(s * 100)}%" not in done | (labels_on_disk() - (redo - mine)):
                run(f"{t} {int(s * 100)}%", build_set(items, t, s), [])
        steer_at_inference: dict[str, list[tuple[str, PreventiveEntry]]] = {}
        for spec in filter(None, args.inference.split(",")):
            entry, coef, where = entry_of(spec)
            label = f"{entry.vector} 100% adapter, steered at inference {coef} {where}"
            if label not in done:
                steer_at_inference.setdefault(entry.vector, []).append((label, entry))
        for name, entries in steer_at_inference.items():
            # The adapter is trained again (same seed) for its steered readings; its own row is the rerun.
            run(f"{name} 100% (rerun)", build_set(items, name, 1.0), [], kind="rerun", inference=entries)
        for spec in filter(None, args.long.split(",")):
            name, _, epochs = spec.partition(":")
            if f"{name} 100%, {epochs} epochs" not in done:
                run(f"{name} 100%, {epochs} epochs", build_set(items, name, 1.0), [], epochs=int(epochs))
        for spec in filter(None, args.preventative.split(",")):
            entry, coef, where = entry_of(spec)
            if f"{entry.vector} 100% + preventative {coef} {where}" not in done:
                run(f"{entry.vector} 100% + preventative {coef} {where}", build_set(items, entry.vector, 1.0), [entry],
                    kind="preventative")
    finally:
        engine.shutdown()
    return 0


def merge_runs(on_disk: list[dict], ours: list[dict], mine: set[str]) -> list[dict]:
    """The file's runs in its order, with this sweep's own runs (labels in ``mine``) in place of
    the file's copies; runs only one side holds are kept. A run this sweep merely read from the
    file never replaces the file's copy, which another sweep may have amended since."""
    by_label = {r["run"]: r for r in ours}
    merged = [by_label[r["run"]] if r["run"] in mine and r["run"] in by_label else r for r in on_disk]
    seen = {r["run"] for r in merged}
    return merged + [r for r in ours if r["run"] not in seen]


def kind_of(run: dict) -> str:
    # Rows of the first sweep carry no kind: theirs follows from their preventative steering.
    return run.get("kind") or ("preventative" if run["preventative"] else "plain")


def correlations(runs: list[dict], traits: list[str]) -> dict:
    """r across the plain fine-tunes (every training set, and the longer runs), not the steered ones."""
    plain = [r for r in runs if kind_of(r) == "plain"]
    per = {}
    for t in traits:
        pred = [r["vectors"][t]["predicted_shift"] for r in plain]
        meas = [r["vectors"][t]["measured_shift"] for r in plain]
        expr = [r["vectors"][t]["expression_change"] for r in plain]
        # Runs recorded before the word counts have none: the words r runs over those that do.
        said = [r["vectors"][t] for r in plain if "words_change" in r["vectors"][t]]
        per[t] = {"predicted_vs_measured": pearson(pred, meas), "measured_vs_expression": pearson(meas, expr),
                  "predicted_vs_expression": pearson(pred, expr), "datasets": len(plain),
                  "measured_vs_words": pearson([v["measured_shift"] for v in said], [v["words_change"] for v in said]),
                  "predicted_vs_words": pearson([v["predicted_shift"] for v in said], [v["words_change"] for v in said]),
                  "datasets_with_words": len(said)}
    return per


def cell(reading: dict) -> str:
    """predicted / measured shift / expression change / words change ("—" for a run without words)."""
    said = f"{reading['words_change']:+.2f}" if "words_change" in reading else "—"
    return (f"{reading['predicted_shift']:+.2f} / {reading['measured_shift']:+.2f} / "
            f"{reading['expression_change']:+.2f} / {said}")


def table(record: dict, traits: list[str]) -> str:
    trained = [r for r in record["runs"] if kind_of(r) != "inference"]
    lines = [f"`make finetune-evidence`: {record['machine']}, {record['model']} (float32), {len(trained)} fine-tunes "
             f"and {len(record['runs']) - len(trained)} inference-steered readings of one of them, "
             f"{sum(r['seconds'] for r in record['runs'])} s in all (one or more sittings); base held-out perplexity "
             f"{record['base']['heldout_perplexity']}. Cells: predicted shift / measured shift / expression change "
             f"(projection) / words change (lexicon score per 100 words; — where the run predates it).", "",
             "| run | " + " | ".join(traits) + " | held-out ppl |", "|---|" + "---|" * (len(traits) + 1)]
    for r in record["runs"]:
        cells = [cell(r["vectors"][t]) for t in traits]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + f" | {r['heldout_perplexity']} |")
    lines += ["", "| r across the plain fine-tunes (no steering; reruns left out) | " + " | ".join(traits) + " |",
              "|---|" + "---|" * len(traits)]
    for key in ("predicted_vs_measured", "measured_vs_expression", "predicted_vs_expression"):
        lines.append(f"| {key.replace('_', ' ')} | "
                     + " | ".join(str(record["correlations"][t][key]) for t in traits) + " |")
    for key in ("measured_vs_words", "predicted_vs_words"):
        lines.append(f"| {key.replace('_', ' ')} change (datasets with words) | "
                     + " | ".join(f"{record['correlations'][t].get(key)} ({record['correlations'][t].get('datasets_with_words', 0)})"
                                  for t in traits) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
