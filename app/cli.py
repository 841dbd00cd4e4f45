"""``persona-server`` command line: ``serve``, ``extract``, ``screen``, ``assess``, ``evidence``, ``finetune`` and ``bench``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    from app import allocator

    allocator.reexec_with_allocator()  # before anything else: it restarts the process
    from app.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if "lora_modules" in overrides:
        overrides["lora_modules"] = shipped_lora_modules(overrides["lora_modules"])
    settings = Settings(**overrides)
    problem = settings.exposure_problem() or quantization_problem(settings) or _engine_problem(settings.engine)
    if problem:
        raise SystemExit(f"persona-server: {problem}")
    # Only now the heavy imports (torch, transformers): a refused start is told at once.
    import uvicorn

    from app.main import create_app
    from app.server import DrainingServer
    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s")
    allocator.log_in_effect()
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    DrainingServer(config, app, settings.drain_notice_s).run()
    return 0


def shipped_lora_modules(entries: list[str]) -> list[str]:
    """``--lora-modules`` entries as ``NAME=PATH``: a bare ``NAME`` is an adapter shipped with the
    package (``vectors/<model>/adapters/NAME``, e.g. ``big5-extraversion-high``), so it serves
    from an installed copy too; a shipped adapter built for another model is refused at load.

    Example::

        shipped_lora_modules(["big5-extraversion-high", "mine=/srv/adapters/mine"])
    """
    from app.settings import shipped_adapters

    shipped = shipped_adapters()
    out = []
    for entry in entries:
        if "=" in entry:
            out.append(entry)
        elif entry in shipped:
            out.append(f"{entry}={shipped[entry]}")
        else:
            raise SystemExit(f"persona-server: --lora-modules {entry!r} is neither NAME=PATH nor a shipped adapter "
                             f"({', '.join(sorted(shipped)) or 'none shipped'})")
    return out


def quantization_problem(settings) -> str | None:
    """Why ``settings.quantization`` cannot be served, told before the model loads: it runs on our
    CPU kernels only (steering.quant), so it is refused rather than served unquantized."""
    if settings.quantization == "none":
        return None
    flag = f"--quantization {settings.quantization}"
    if settings.engine == "vllm":
        return f"{flag} runs on our engine's CPU kernels, not vLLM's: serve it with --engine hf, or drop the flag"
    if not settings.cpu_kernels:
        return f"{flag} runs on our CPU kernels, which PERSONA_CPU_KERNELS=0 turns off: turn them on, or drop the flag"
    import torch

    from steering import cpu_kernels

    on_gpu = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    if on_gpu or not cpu_kernels.supported():
        return f"{flag} runs on our CPU kernels (x86-64 with AVX2 and a C++ compiler, the model on the CPU): not here"
    return None


def _engine_problem(engine: str) -> str | None:
    """Why ``engine`` cannot run here, told before the model loads (vLLM is an optional install)."""
    import importlib.util

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        return ("--engine vllm needs vLLM, which is not installed in this environment: run `make install-vllm` "
                "(vLLM's CPU build) or `pip install 'persona-server[vllm]'` (GPUs), or serve with --engine hf")
    return None


def _extract(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tqdm import tqdm

    from app.settings import Settings
    from steering.engine import Engine
    from steering.extract import Judge, TraitDefinition, build_vector
    from steering.model import load_model
    from steering.runner import EngineRunner

    lm = load_model(args.model, dtype="float32", device=args.device)
    neutral = json.loads(Settings().neutral_prompts_file.read_text())["prompts"]
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


def _offline(args: argparse.Namespace):
    """The model, the registry (seeded with shipped vectors) and a started engine, for
    commands that run without the server."""
    from app.settings import Settings
    from steering.engine import Engine
    from steering.model import load_model
    from steering.registry import VectorRegistry

    settings = Settings()
    lm = load_model(args.model, dtype="float32", device=args.device, cache_dir=settings.cache_dir)
    registry = VectorRegistry(settings.data_dir / "vectors", model_name=lm.name, fingerprint=lm.fingerprint,
                              num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    registry.seed_from(settings.shipped_vectors_dir)
    engine = Engine(lm, max_batch_size=32, max_waiting=1 << 20)
    engine.start()
    return lm, registry, engine


def _adapter(args: argparse.Namespace, lm):
    """The LoRA adapter (a PEFT directory) that ``--adapter`` names, checked against ``lm``; None
    without the flag. A command given one measures the adapter instead of the base model."""
    if not getattr(args, "adapter", None):
        return None
    from app.settings import Settings
    from steering.adapters import AdapterError, read_adapter

    try:
        return read_adapter(Path(args.adapter), lm, max_rank=Settings().max_lora_rank)
    except AdapterError as exc:
        raise SystemExit(f"persona-server: --adapter {args.adapter}: {exc}") from None


def _screen(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from tqdm import tqdm

    from steering.runner import EngineRunner
    from steering.screen import Screener, ScreenReport, jsonl_lines

    lm, registry, engine = _offline(args)
    try:
        vectors = [registry.get(name) for name in args.vector]
    except KeyError as exc:
        engine.shutdown()
        raise SystemExit(str(exc)) from None
    layers = {v.name: args.layer for v in vectors} if args.layer else None
    report = ScreenReport([v.name for v in vectors], args.top)
    screener = Screener(EngineRunner(engine, adapter=_adapter(args, lm)), lm.tokenizer, vectors, layers=layers,
                        generate=not args.no_generate)

    async def run(out) -> None:
        with tqdm(desc="screen", unit="sample") as bar:
            async for row in screener.rows(jsonl_lines(args.data), report):
                out.write(json.dumps(row) + "\n")
                bar.update(1)

    try:
        with open(args.out, "w", encoding="utf-8") if args.out else open("/dev/null", "w") as out:
            asyncio.run(run(out))
    finally:
        engine.shutdown()
    summary = report.summary(not args.no_generate)
    for error in summary["errors"]:
        print(f"line {error['line']}: {error['error']}", file=sys.stderr)
    for name, v in summary["vectors"].items():
        mean = v["mean_diff"] if v["mean_diff"] is not None else v["mean_cheap_diff"]
        print(f"{name}: mean projection difference {mean:+.3f} over {summary['samples']} samples; top lines "
              + ", ".join(str(t["line"]) for t in v["top"][:10]))
    return 0


def _parse_steering(items: list[str]) -> list:
    from steering.steer import SteeringSpec

    specs = []
    for item in items:
        name, _, value = item.partition("=")
        try:
            specs.append(SteeringSpec(name, float(value)))
        except ValueError:
            raise SystemExit(f"--steering expects NAME=COEFFICIENT, got {item!r}") from None
    return specs


def _assess(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from app.settings import Settings
    from steering.assess import Inventory, assess
    from steering.steer import resolve_steering

    lm, registry, engine = _offline(args)
    try:
        adapter = _adapter(args, lm)
        specs = _parse_steering(args.steering or [])
        steering = resolve_steering(specs, registry) if specs else None
        inventory = Inventory.load(Settings().inventories_dir / f"{args.inventory}.json")
        runs = [("unsteered", None)] if not steering or args.compare else []
        runs += [("steered", steering)] if steering else []
        results = {}
        for label, steer in runs:
            with tqdm(total=len(inventory.items) * args.repetitions, desc=f"assess {label}", unit="prompt") as bar:
                results[label] = asyncio.run(assess(engine, inventory, repetitions=args.repetitions, steering=steer,
                                                    seed=args.seed, progress=bar.update, adapter=adapter))
    finally:
        engine.shutdown()
    labels = list(results)
    if inventory.kind == "mbti":
        print("dimension  " + "  ".join(f"{label:>18}" for label in labels))
        for dim in inventory.dimensions:
            first = dim.split("-")[0]
            cells = [f"{first} {r['dimensions'][dim]['share'][first]:.2f} k={r['dimensions'][dim]['kappa']:.2f}" for r in results.values()]
            print(f"{dim:<10} " + "  ".join(f"{c:>18}" for c in cells))
        print("type       " + "  ".join(f"{r['type']:>18}" for r in results.values()))
    else:
        print("factor             " + "  ".join(f"{label:>16}" for label in labels))
        for factor in inventory.dimensions:
            cells = [f"{r['factors'][factor]['score']:.2f} k={r['factors'][factor]['kappa']:.2f}" for r in results.values()]
            print(f"{factor:<18} " + "  ".join(f"{c:>16}" for c in cells))
    return 0


def _evidence_names(args: argparse.Namespace, assets: Path, traits_dir: Path, command: str):
    """``vectors/evidence.json`` and the vector names asked for (default: all), each checked to be
    known and held out from its trait definition; exits naming an unknown one."""
    import json

    from steering.evidence import check_held_out, load_evidence

    evidence = load_evidence(assets / "evidence.json")
    names = args.vector or sorted(evidence)
    unknown = sorted(set(names) - set(evidence))
    if unknown:
        raise SystemExit(f"persona-server {command}: no evidence for {', '.join(unknown)} in {assets / 'evidence.json'}")
    for name in names:
        check_held_out(evidence[name], json.loads((traits_dir / f"{name}.json").read_text()))
    return evidence, names


def _evidence(args: argparse.Namespace) -> int:
    import asyncio
    import datetime
    import json
    import platform
    import time

    from app.settings import shipped_assets_dir
    from steering.engine import Engine
    from steering.evidence import PAPER_R, markdown, measure
    from steering.model import load_model
    from steering.runner import EngineRunner
    from steering.vector import PersonaVector

    assets = shipped_assets_dir()
    evidence, names = _evidence_names(args, assets, assets / "traits", "evidence")
    lm = load_model(args.model, dtype="float32", device=args.device)
    out = Path(args.out or Path("docs") / "evidence" / f"{lm.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(lm, max_batch_size=32, max_waiting=1 << 20)
    engine.start()
    results = []
    started = time.monotonic()
    try:
        for name in names:
            vector = PersonaVector.load(assets / lm.name / f"{name}.safetensors")
            vector.check_model(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size)
            t = time.monotonic()
            res = asyncio.run(measure(EngineRunner(engine), lm.tokenizer, vector, evidence[name],
                                      questions=args.questions, max_new_tokens=args.max_tokens))
            results.append(res)
            print(f"{name}: n={res['n']} r(response)={res['r_response']} r(lexicon)={res['r_lexicon']} "
                  f"r(level)={res['r_level']} AUROC={res['auroc']:.3f} ({time.monotonic() - t:.0f} s)", flush=True)
    finally:
        engine.shutdown()
    if not results:
        return 1
    first = results[0]
    header = (f"Latest `make evidence`: {datetime.date.today().isoformat()}, {platform.machine()}, {lm.name} (float32), "
              f"{len(first['levels'])} levels x {first['questions']} questions = {first['n']} greedy answers of at most "
              f"{args.max_tokens} tokens per vector, unsteered; {time.monotonic() - started:.0f} s for "
              f"{len(results)} vectors.")
    if args.vector and not args.questions and out.is_file():  # a run over some vectors keeps the others' results
        stored = json.loads(out.read_text())
        if stored.get("max_new_tokens") == args.max_tokens:
            fresh = {r["vector"] for r in results}
            results = sorted([r for r in stored["results"] if r["vector"] not in fresh] + results, key=lambda r: r["vector"])
    table = markdown(results, header=header)
    out.write_text(json.dumps({"model": lm.name, "max_new_tokens": args.max_tokens, "results": results},
                              separators=(",", ":"), ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    if args.page:
        page = Path(args.page)
        text = page.read_text()
        start, end = "<!-- evidence:start -->", "<!-- evidence:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            page.write_text(head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1])
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import datetime
    import json
    import platform
    import time

    from tqdm import tqdm

    from app.settings import shipped_assets_dir
    from steering.atomic import atomic_write_bytes
    from steering.engine import Engine
    from app.settings import Settings
    from steering.extract import TraitDefinition, build_vector, definition_hash
    from steering.methods import build_steers, compare, extraction_spec, markdown
    from steering.model import load_model
    from steering.runner import EngineRunner
    from steering.vector import PersonaVector

    if args.rebuild and (not args.write_definitions or args.traits_dir):
        raise SystemExit("persona-server methods: --rebuild needs --write-definitions (it builds from the new "
                         "definitions) and the shipped definitions (it replaces the shipped vectors)")
    assets = shipped_assets_dir()
    traits_dir = Path(args.traits_dir) if args.traits_dir else assets / "traits"
    evidence, names = _evidence_names(args, assets, traits_dir, "methods")
    lm = load_model(args.model, dtype="float32", device=args.device)
    neutral = json.loads(Settings().neutral_prompts_file.read_text())["prompts"]
    out = Path(args.out or Path("docs") / "evidence" / f"methods-{lm.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine(lm, max_batch_size=32, max_waiting=1 << 20)
    engine.start()
    results = []
    started = time.monotonic()
    try:
        for name in names:
            t = time.monotonic()
            shipped_path = assets / lm.name / f"{name}.safetensors"
            shipped = PersonaVector.load(shipped_path) if shipped_path.is_file() else None
            trait = TraitDefinition.load(traits_dir / f"{name}.json")
            with tqdm(desc=f"methods {name}", unit="pass") as bar:
                res = asyncio.run(compare(EngineRunner(engine, progress=bar.update), lm.tokenizer, trait, evidence[name],
                                          lm.num_layers, shipped, neutral_prompts=neutral))
            samples = res.pop("samples")
            best, decision = res["chosen"], res["decision"]
            print(f"{name}: chose {best}; nested CV AUROC {res['nested']['all']}; {decision['reason']}: "
                  f"{'ship' if decision['ship'] else 'keep the previous build'} ({time.monotonic() - t:.0f} s)", flush=True)
            if args.write_definitions and decision["ship"]:
                path = traits_dir / f"{name}.json"
                data = json.loads(path.read_text())
                data["extraction"] = extraction_spec(res, lm.name)
                vector = None
                if args.rebuild:  # what `make vectors` would build from the new definition, reusing the states
                    trait = dataclasses.replace(TraitDefinition.load(path), extraction=data["extraction"],
                                                digest=definition_hash(data))
                    vector = asyncio.run(build_vector(EngineRunner(engine), lm, trait, neutral_prompts=neutral,
                                                      samples=samples[best["method"]]))
                    if not build_steers(vector):  # its own sweep, at its own range, overrules the choice's check
                        res["decision"] = {**decision, "ship": False,
                                           "reason": decision["reason"] + "; the rebuilt vector's own sweep does not "
                                                     "rise from -2c to +2c at its range's lower end"}
                        print(f"  {name}: not shipped, {res['decision']['reason']}", flush=True)
                if res["decision"]["ship"]:
                    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())
                    if vector is not None:
                        vector.save(assets / lm.name / f"{name}.safetensors")
                        lo, hi = vector.coefficient_range
                        print(f"  rebuilt {name}: layer {vector.recommended_layer}, held-out AUROC "
                              f"{vector.extra['heldout_auroc']:.3f}, coefficients {lo:g}..{hi:g}", flush=True)
            results.append(res)
            if out.is_file():  # stored as each vector finishes: a long run stopped early keeps what it measured
                kept = {r["vector"]: r for r in json.loads(out.read_text())["results"] if "nested" in r}  # not the old rule's
                merged = sorted({**kept, res["vector"]: res}.values(), key=lambda r: r["vector"])
            else:
                merged = [res]
            atomic_write_bytes(out, (json.dumps({"model": lm.name, "results": merged}, indent=1) + "\n").encode())
    finally:
        engine.shutdown()
    if not results:
        return 1
    header = (f"Latest `make methods`: {datetime.date.today().isoformat()}, {platform.machine()}, {lm.name} (float32), "
              f"{time.monotonic() - started:.0f} s for {len(results)} vectors. Each candidate cell: mean AUROC over "
              f"the folds at its best layer (✗: checked and does not steer); nested CV: chosen on the other folds, "
              f"scored on the one left out, mean ± sd over folds.")
    results = json.loads(out.read_text())["results"]  # with the vectors an earlier run measured
    table = markdown(results, header=header)
    atomic_write_bytes(out.with_suffix(".md"), (table + "\n").encode())
    print(table)
    if args.page:
        page = Path(args.page)
        text = page.read_text()
        start, end = "<!-- methods:start -->", "<!-- methods:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            atomic_write_bytes(page, (head + start + "\n" + table + "\n" + end + rest.split(end, 1)[1]).encode())
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def _parse_preventative(item: str):
    """``NAME=COEFFICIENT`` (the vector's recommended layer), ``NAME=COEFFICIENT@L1,L2`` or ``NAME=COEFFICIENT@all``."""
    from steering.finetune import PreventiveEntry

    name, _, rest = item.partition("=")
    value, _, layers = rest.partition("@")
    try:
        parsed = "all" if layers == "all" else [int(x) for x in layers.split(",")] if layers else None
        return PreventiveEntry(name, float(value), parsed)
    except ValueError:
        raise SystemExit(f"--preventative expects NAME=COEFFICIENT[@LAYERS|@all], got {item!r}") from None


def _finetune(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import tempfile
    import time
    import uuid

    from tqdm import tqdm

    from app.settings import Settings
    from app.training import eval_prompts, fine_tuned_name
    from steering.finetune import Hyperparameters, MonitorSpec, TrainingFileError, TrainingJob, check_chat_file, train
    from steering.runner import EngineRunner
    from steering.screen import Screener, ScreenReport, jsonl_lines

    settings = Settings()
    for path in filter(None, (args.data, args.validation)):
        try:
            check_chat_file(Path(path), max_rows=settings.max_training_rows)
        except TrainingFileError as exc:
            raise SystemExit(f"persona-server: {path}: {exc}") from None
    preventative = [_parse_preventative(item) for item in args.preventative or []]
    lm, registry, engine = _offline(args)
    try:
        try:
            vectors = {name: registry.get(name) for name in {p.vector for p in preventative} | set(args.monitor or [])}
        except KeyError as exc:
            raise SystemExit(f"persona-server: {exc}") from None
        monitor = [MonitorSpec(name, args.layer or vectors[name].recommended_layer) for name in args.monitor or []]
        predicted = {}
        if monitor:
            report = ScreenReport([m.vector for m in monitor], 1)
            screener = Screener(EngineRunner(engine), lm.tokenizer, [vectors[m.vector] for m in monitor],
                                layers={m.vector: m.layer for m in monitor}, max_new_tokens=settings.finetune_screen_tokens)

            async def screen() -> None:
                with tqdm(desc="predict shift", unit="sample") as bar:
                    async for _row in screener.rows(jsonl_lines(args.data), report):
                        bar.update(1)

            asyncio.run(screen())
            predicted = {name: v["mean_diff"] for name, v in report.summary(True)["vectors"].items()}
    finally:
        engine.shutdown()
    name = fine_tuned_name(args.suffix, f"ftjob-{uuid.uuid4().hex}")
    out = Path(args.out or name)
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for vector in vectors.values():
            files[vector.name] = str(Path(scratch) / f"{vector.name}.safetensors")
            vector.save(Path(files[vector.name]))
        job = TrainingJob(
            model=args.model, cache_dir=str(settings.cache_dir), training_file=args.data, validation_file=args.validation,
            output_dir=str(out), preventative=preventative, monitor=monitor, vector_files=files,
            hyperparameters=Hyperparameters(args.epochs, args.batch_size, args.learning_rate_multiplier, args.seed),
            eval_prompts={m.vector: eval_prompts(settings, m.vector, Path(args.data)) for m in monitor},
            max_tokens=min(settings.finetune_max_tokens, lm.context_length),
            threads=args.threads or settings.finetune_threads or max(1, (os.cpu_count() or 2) // 2),
            deadline=time.time() + args.timeout if args.timeout else None)
        with tqdm(desc="finetune", unit="step") as bar:
            def progress(event: dict) -> None:
                if event["type"] == "metrics" and "train_loss" in event:
                    bar.total = event["total_steps"]
                    bar.set_postfix(loss=f"{event['train_loss']:.4f}")
                    bar.update(1)

            try:
                result = train(job, emit=progress)
            except TrainingFileError as exc:
                raise SystemExit(f"persona-server: {exc}") from None
    print(f"wrote {out}: {result['steps']} steps, loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, "
          f"{result['trained_tokens']} trained tokens")
    for vector, reading in result["shifts"].items():
        print(f"{vector} (layer {reading['layer']}): predicted shift {predicted[vector]:+.3f}, measured shift "
              f"{reading['measured_shift']:+.3f} (base {reading['base_projection']:+.3f}, "
              f"fine-tuned {reading['fine_tuned_projection']:+.3f})")
    if args.register:
        from steering.adapters import AdapterStore

        AdapterStore(settings.data_dir / "adapters", lm).add(name, out)
        print(f"registered as '{name}' in {settings.data_dir / 'adapters'}: `persona-server serve` serves it as a model")
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
    serve.add_argument("--engine", choices=["hf", "vllm"], help="generation engine: ours (hf, default) or vLLM's")
    serve.add_argument("--quantization", choices=["none", "int8"],
                       help="int8: weight-only int8 linear layers, a scale per output row (our engine on CPU)")
    serve.add_argument("--tensor-parallel-size", dest="tensor_parallel_size", type=int,
                       help="vLLM engine: GPUs per model (tensor parallelism)")
    serve.add_argument("--data-dir", dest="data_dir")
    serve.add_argument("--lora-modules", dest="lora_modules", nargs="+", metavar="NAME=PATH",
                       help="LoRA adapters (PEFT directories) to serve at startup, as vLLM takes them; a bare NAME "
                            "serves a shipped adapter (big5-extraversion-high, big5-extraversion-low, ...)")
    serve.add_argument("--enable-lora", dest="enable_lora", action="store_const", const=True,
                       help="vLLM engine: turn LoRA on in vLLM (implied by --lora-modules; our engine always serves "
                            "adapters)")
    serve.add_argument("--max-loras", dest="max_loras", type=int, help="most adapters loaded at once (default 8)")
    serve.add_argument("--max-lora-rank", dest="max_lora_rank", type=int, help="highest LoRA rank served (default 64)")
    serve.add_argument("--generation-config", dest="generation_config", choices=["auto", "none"],
                       help="auto: sampling defaults from the model's generation_config.json; none: ignore it")
    serve.add_argument("--default-temperature", dest="default_temperature", type=float)
    serve.add_argument("--default-top-p", dest="default_top_p", type=float)
    serve.add_argument("--default-top-k", dest="default_top_k", type=int)
    serve.add_argument("--default-repetition-penalty", dest="default_repetition_penalty", type=float)
    serve.add_argument("--default-max-tokens", dest="default_max_tokens", type=int)
    serve.set_defaults(func=_serve)

    extract = sub.add_parser("extract", help="build a persona vector from a trait definition")
    extract.add_argument("--trait", required=True, nargs="+", help="vectors/traits/NAME.json (one or more)")
    extract.add_argument("--method", default=None, choices=["contrastive_texts", "contrastive_prompts", "labelled_sentences"],
                         help="default: the definition's extraction.method (as `make methods` chose it), else contrastive_texts")
    extract.add_argument("--model", default="default")
    extract.add_argument("--device", default="cpu")
    extract.add_argument("--out", help="output .safetensors for one trait (default vectors/<model>/<trait>.safetensors)")
    extract.add_argument("--judge-url", help="OpenAI-compatible base URL of a judge that filters pairs")
    extract.add_argument("--judge-model", default="gpt-4o-mini")
    extract.add_argument("--judge-key")
    extract.set_defaults(func=_extract)

    screen = sub.add_parser("screen", help="rank training samples by projection difference")
    screen.add_argument("data", help="JSONL: {'messages': [...]} or {'prompt', 'response'} per line")
    screen.add_argument("--vector", action="append", required=True, help="vector name (repeatable)")
    screen.add_argument("--layer", type=int, help="layer for every vector (default: each one's recommended layer)")
    screen.add_argument("--top", type=int, default=50)
    screen.add_argument("--out", help="per-sample scores as JSONL")
    screen.add_argument("--no-generate", action="store_true", help="cheap variant: skip the natural answers")
    screen.add_argument("--adapter", help="a LoRA adapter (PEFT directory) to screen against instead of the base model")
    screen.add_argument("--model", default="default")
    screen.add_argument("--device", default="cpu")
    screen.set_defaults(func=_screen)

    assess_p = sub.add_parser("assess", help="measure the model's personality with an inventory")
    assess_p.add_argument("--inventory", choices=["mbti", "big5"], default="mbti")
    assess_p.add_argument("--adapter", help="a LoRA adapter (PEFT directory) to assess instead of the base model")
    assess_p.add_argument("--repetitions", type=int, default=30)
    assess_p.add_argument("--steering", action="append", help="NAME=COEFFICIENT (repeatable)")
    assess_p.add_argument("--compare", action="store_true", help="also run unsteered and show both")
    assess_p.add_argument("--seed", type=int, default=0)
    assess_p.add_argument("--model", default="default")
    assess_p.add_argument("--device", default="cpu")
    assess_p.set_defaults(func=_assess)

    evidence = sub.add_parser("evidence", help="measure monitor validity and held-out AUROC of the shipped vectors")
    evidence.add_argument("--vector", action="append", help="vector name (repeatable; default: every one in vectors/evidence.json)")
    evidence.add_argument("--questions", type=int, help="use only the first N questions of each vector")
    evidence.add_argument("--max-tokens", dest="max_tokens", type=int, default=48)
    evidence.add_argument("--out", help="JSON output (default docs/evidence/<model>.json; the table goes beside it as .md)")
    evidence.add_argument("--page", help="rewrite the table between the evidence markers of this docs page")
    evidence.add_argument("--model", default="default")
    evidence.add_argument("--device", default="cpu")
    evidence.set_defaults(func=_evidence)

    methods = sub.add_parser("methods", help="compare extraction methods as monitors on the evidence set, per vector")
    methods.add_argument("--vector", action="append", help="vector name (repeatable; default: every one in vectors/evidence.json)")
    methods.add_argument("--traits-dir", dest="traits_dir", help="trait definitions (default: the shipped ones)")
    methods.add_argument("--write-definitions", dest="write_definitions", action="store_true",
                         help="record each vector's chosen candidate as its definition's 'extraction' object")
    methods.add_argument("--rebuild", action="store_true",
                         help="with --write-definitions: rebuild each shipped vector from its new definition, as "
                              "`make vectors` does, reusing the states read for the comparison")
    methods.add_argument("--out", help="JSON output (default docs/evidence/methods-<model>.json; the table beside it as .md)")
    methods.add_argument("--page", help="rewrite the table between the methods markers of this docs page")
    methods.add_argument("--model", default="default")
    methods.add_argument("--device", default="cpu")
    methods.set_defaults(func=_methods)

    finetune = sub.add_parser("finetune", help="LoRA fine-tuning, with preventative steering and persona shifts")
    finetune.add_argument("data", help="chat JSONL (OpenAI's fine-tuning format): {'messages': [...]} per line")
    finetune.add_argument("--validation", help="validation file, same format")
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    finetune.add_argument("--learning-rate-multiplier", dest="learning_rate_multiplier", type=float, default=1.0)
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--suffix", help="part of the adapter's name: ft-SUFFIX-XXXXXXXX")
    finetune.add_argument("--preventative", action="append",
                          help="NAME=COEFFICIENT[@LAYERS|@all]: steer while training (repeatable)")
    finetune.add_argument("--monitor", action="append", help="vector whose predicted and measured shift to report (repeatable)")
    finetune.add_argument("--layer", type=int, help="layer of every monitored vector (default: each one's recommended layer)")
    finetune.add_argument("--threads", type=int, help="training threads (default: half the cores)")
    finetune.add_argument("--timeout", type=float, help="stop training after this many seconds")
    finetune.add_argument("--out", help="adapter directory (default: ./ft-...)")
    finetune.add_argument("--register", action="store_true",
                          help="also add the adapter to PERSONA_DATA_DIR's store, where `serve` serves it")
    finetune.add_argument("--model", default="default")
    finetune.add_argument("--device", default="cpu")
    finetune.set_defaults(func=_finetune)

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
