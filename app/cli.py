"""``persona-server`` command line: ``serve``, ``extract`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _extract(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tqdm import tqdm

    from app.settings import REPO_VECTORS
    from steering.engine import Engine
    from steering.extract import Judge, TraitDefinition, build_vector
    from steering.model import load_model
    from steering.runner import EngineRunner

    lm = load_model(args.model, dtype="float32", device=args.device)
    neutral = json.loads((REPO_VECTORS / "neutral_prompts.json").read_text())["prompts"]
    judge = Judge(args.judge_url, args.judge_model, args.judge_key) if args.judge_url else None
    engine = Engine(lm, max_batch_size=32, max_waiting=1 << 20)
    engine.start()
    try:
        for path in args.trait:
            trait = TraitDefinition.load(Path(path))
            with tqdm(desc=f"extract {trait.name}", unit="pass") as bar:
                vector = asyncio.run(build_vector(EngineRunner(engine, progress=bar.update), lm, trait,
                                                  neutral_prompts=neutral, method=args.method, judge=judge))
            out = Path(args.out) if args.out and len(args.trait) == 1 else Path("vectors") / lm.name / f"{trait.name}.safetensors"
            vector.save(out)
            lo, hi = vector.coefficient_range
            print(f"wrote {out}: layer {vector.recommended_layer}, held-out AUROC {vector.extra['heldout_auroc']:.3f}, "
                  f"coefficients {lo:g}..{hi:g}")
    finally:
        engine.shutdown()
    return 0


def _bench(args: argparse.Namespace) -> int:
    from app.bench import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="persona-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--model", help="'default', a HF model directory, or a .gguf file")
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    serve.add_argument("--device", help="auto, cpu or cuda")
    serve.add_argument("--data-dir", dest="data_dir")
    serve.set_defaults(func=_serve)

    extract = sub.add_parser("extract", help="build a persona vector from a trait definition")
    extract.add_argument("--trait", required=True, nargs="+", help="vectors/traits/NAME.json (one or more)")
    extract.add_argument("--method", default="contrastive_texts",
                         choices=["contrastive_texts", "contrastive_prompts", "labelled_sentences"])
    extract.add_argument("--model", default="default")
    extract.add_argument("--device", default="cpu")
    extract.add_argument("--out", help="output .safetensors for one trait (default vectors/<model>/<trait>.safetensors)")
    extract.add_argument("--judge-url", help="OpenAI-compatible base URL of a judge that filters pairs")
    extract.add_argument("--judge-model", default="gpt-4o-mini")
    extract.add_argument("--judge-key")
    extract.set_defaults(func=_extract)

    bench = sub.add_parser("bench", help="load-test a running server (like vllm bench serve)")
    bench.add_argument("--url", default="http://127.0.0.1:8000")
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--concurrency", type=int, default=32)
    bench.add_argument("--prompt-words", type=int, default=16)
    bench.add_argument("--max-tokens", type=int, default=64)
    bench.add_argument("--steering", choices=["none", "mixed"], default="mixed")
    bench.add_argument("--vectors", help="comma-separated vectors for the mix (default: all on the server)")
    bench.add_argument("--api-key")
    bench.add_argument("--json", action="store_true", help="print the summary as JSON")
    bench.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
