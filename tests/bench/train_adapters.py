"""``make adapters``, first step: train the shipped Big Five adapters of the default model.

One LoRA adapter per trait pole, each on its own opinion question-answer set
(``vectors/finetune/bigfive/<factor>-<pole>.jsonl``, written for this project, no emoji in it),
with the project's training module (:func:`steering.finetune.train`: PEFT LoRA on every linear
projection, transformers' ``Trainer``, loss on the answers only). Each adapter lands in
``vectors/<model>/adapters/big5-<factor>-<pole>/`` in PEFT's format, with a ``persona.json`` that
names the base model's fingerprint so a server on another model refuses it. The training record
(hyperparameters, first and last loss, seconds) goes to ``docs/finetune/adapters-training.json``;
``tests/bench/adapters_evidence.py`` then measures what each adapter does.

Small on purpose: rank 4 keeps an adapter near 5 MB in float32.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from app.settings import Settings
from steering.adapters import PERSONA_FILE
from steering.atomic import atomic_write_bytes, replace_dir
from steering.finetune import BASE_LEARNING_RATE, Hyperparameters, LoraSettings, TrainingJob, train
from steering.model import load_model

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "vectors" / "finetune" / "bigfive"
# The base model's public name: the path PEFT records is this machine's cache, meaningless elsewhere.
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def adapter_name(training_file: Path) -> str:
    """``extraversion-high.jsonl`` -> ``big5-extraversion-high``."""
    return "big5-" + training_file.stem


def progress(name: str):
    def emit(event: dict) -> None:
        if "train_loss" in event and event["step"] % 10 == 0:
            print(f"  {name} step {event['step']}/{event['total_steps']} loss {event['train_loss']}", flush=True)
    return emit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sets", default="extraversion-high,extraversion-low,agreeableness-high,agreeableness-low",
                   help="training sets to train on (those whose file is missing are skipped)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr-multiplier", type=float, default=6.0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--alpha", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--record", default=str(ROOT / "docs" / "finetune" / "adapters-training.json"))
    args = p.parse_args(argv)
    # A stopped run still removes its half-built adapter (it would otherwise ship inside vectors/).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    settings = Settings()
    record_path = Path(args.record)
    record = json.loads(record_path.read_text()) if record_path.exists() else {"adapters": {}}
    for set_name in filter(None, args.sets.split(",")):
        training_file = DATA / f"{set_name}.jsonl"
        if not training_file.exists():
            print(f"{set_name}: no {training_file.name}, skipped", flush=True)
            continue
        name = adapter_name(training_file)
        lm = load_model("default", dtype="float32", device="cpu", cache_dir=settings.cache_dir,
                        prepack=False, cpu_kernels=False)
        target = settings.shipped_vectors_dir / lm.name / "adapters" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=target.parent))
        built = scratch / name
        t0 = time.monotonic()
        try:
            job = TrainingJob(model="default", training_file=str(training_file), output_dir=str(built),
                              cache_dir=str(settings.cache_dir),
                              hyperparameters=Hyperparameters(args.epochs, args.batch_size, args.lr_multiplier, 0),
                              lora=LoraSettings(r=args.rank, alpha=args.alpha, rslora=True), threads=args.threads)
            result = train(job, lm=lm, emit=progress(name))
            config_file = built / "adapter_config.json"
            config = json.loads(config_file.read_text())
            config["base_model_name_or_path"] = BASE_ID
            atomic_write_bytes(config_file, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            atomic_write_bytes(built / PERSONA_FILE, json.dumps(
                {"base_model": lm.name, "base_fingerprint": lm.fingerprint}).encode())
            replace_dir(built, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = round(time.monotonic() - t0)
        record["adapters"][name] = {
            "training_file": str(training_file.relative_to(ROOT)), "rows": sum(1 for _ in training_file.open()),
            "epochs": args.epochs, "batch_size": args.batch_size,
            "learning_rate": args.lr_multiplier * BASE_LEARNING_RATE, "rank": args.rank, "alpha": args.alpha, "rslora": True,
            "trained_tokens": result["trained_tokens"], "steps": result["steps"],
            "first_loss": round(result["first_loss"], 4), "last_loss": round(result["last_loss"], 4),
            "seconds": seconds, "answer_tokens_per_s": round(result["trained_tokens"] / max(seconds, 1), 1),
            "bytes": (target / "adapter_model.safetensors").stat().st_size,
            "threads": args.threads, "machine": platform.machine(), "torch_threads": torch.get_num_threads(),
        }
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record_path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        print(f"{name}: loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}, {seconds} s, -> {target}",
              flush=True)
        del lm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
