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
    from steering.extract import TraitDefinition, build_from_texts
    from steering.model import load_model

    trait = TraitDefinition.load(Path(args.trait))
    lm = load_model(args.model, dtype="float32", device=args.device)
    vector = build_from_texts(lm, trait, coefficient_range=(args.coef_min, args.coef_max))
    out = Path(args.out) if args.out else Path("vectors") / lm.name / f"{trait.name}.safetensors"
    vector.save(out)
    print(f"wrote {out}: recommended layer {vector.recommended_layer}, norm there "
          f"{float(vector.direction(vector.recommended_layer).norm()):.2f}")
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
    extract.add_argument("--trait", required=True, help="vectors/traits/NAME.json")
    extract.add_argument("--model", default="default")
    extract.add_argument("--device", default="cpu")
    extract.add_argument("--out", help="output .safetensors (default vectors/<model>/<trait>.safetensors)")
    extract.add_argument("--coef-min", type=float, default=0.5)
    extract.add_argument("--coef-max", type=float, default=2.5)
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
