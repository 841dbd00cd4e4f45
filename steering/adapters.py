"""LoRA adapters in PEFT's format: read and checked against the served model, kept in a store
under the data directory, and applied per token inside the engine's packed steps.

An adapter on disk is PEFT's standard directory: ``adapter_config.json`` and
``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is refused). Only LoRA on the
decoder blocks' projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
``up_proj``, ``down_proj``) is applied; anything else an adapter carries is refused rather than
silently dropped, naming the config field or tensor.

The base weights are never touched. For the tokens of a step that use an adapter, the engine
adds ``(x A^T) B^T * scaling`` to the base product, in float32, then rounds to the model's dtype:
PEFT's own order of operations (its ``lora_B(lora_A(x)) * scaling`` added to the base result).
Unlike PEFT's matrix products, each token's products never depend on how many other tokens share
the step (a BLAS kernel picks its blocking, and so its order of accumulation, by the number of
rows): where the engine computes with :mod:`steering.cpu_kernels`, one ``lora_add`` call per
layer and group adds every adapter's deltas with ``linear``'s fixed chain of multiply-adds per
output element; elsewhere they are computed elementwise, then summed along a contiguous axis
(the same guarantee, at several times the memory traffic).

A request holds a reference to its :class:`Adapter`, so unloading one never disturbs the
requests already using it; its tensors are freed when the last of them ends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from steering.atomic import atomic_write_bytes, fsync_dir, replace_dir
from steering.hooks import ThreadScopedHooks
from steering.store import SharedStore

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"
# Written beside PEFT's two files by this server: the base model the adapter was checked against.
PERSONA_FILE = "persona.json"
PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How the engine's fused forward groups the parts (steering.fastpath): parts sharing an input
# share one product with their stacked A matrices.
FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
                "down": ("down_proj",)}
# Config fields PEFT uses for things this server does not apply; each must be unset.
_UNSUPPORTED_FIELDS = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
                       "target_parameters", "fan_in_fan_out")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served as given (HTTP 400); ``param`` names the field or tensor."""

    status = 400

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class AdapterConflictError(AdapterError):
    """The adapter belongs to another base model, the name is taken, or the store is full (409)."""

    status = 409


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is loaded (404)."""

    status = 404


def validate_adapter_name(name: str, param: str = "lora_name") -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``_.-``, at most 64), else AdapterError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise AdapterError(f"invalid adapter name {str(name)[:80]!r}: use letters, digits, '_', '.', '-' "
                           "(at most 64, starting with a letter or digit)", param=param)
    return name


@dataclass(eq=False)
class _LoraGroup:
    """LoRA on parts that read the same input, as one product: their A matrices stacked in ``a``
    ``[ranks, in]``, their B matrices block-diagonal in ``b`` ``[out, ranks]`` (a part's outputs
    read only its own ranks; outputs of parts without LoRA are zero rows) and each output's
    scaling in ``scale`` ``[out]``; ``out`` is the width of the group's product.

    Where the engine computes with :mod:`steering.cpu_kernels` (``kernels`` set), a group keeps
    each part's B alone instead of ``b`` and ``scale``: ``blocks`` (each ``[out_p, width]``, its
    ranks padded with zeros to whole 8-lane chunks, so a rank under 8 does not fall to the
    kernel's scalar tail and the zeros of a block-diagonal ``b`` are never multiplied), with the
    (out from, out to, rank from, rank to) of each in ``meta`` and its scaling in ``scales``:
    the arguments of the kernels' ``lora_add``, which :class:`LoraStep` calls once per layer and
    group for every adapter of a step.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None, scale: torch.Tensor | None, kernels=None,
                 parts: list[tuple[int, int, int, int, torch.Tensor, float]] = ()):
        self.a, self.b, self.scale, self.kernels = a, b, scale, kernels
        self.blocks = [block for *_, block, _s in parts]
        self.meta = [v for c0, c1, r0, r1, _b, _s in parts for v in (c0, c1, r0, r1)]
        self.scales = [s for *_, s in parts]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b, self.scale, *self.blocks) if t is not None]

    def add_to(self, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> None:
        """Add this group's delta for the tokens ``rows`` of ``x`` ``[T, in]`` to ``out`` ``[T, out]`` in place."""
        if self.blocks:
            self.kernels.lora_add(x.contiguous(), out, rows.contiguous(), [0, rows.shape[0], 0, len(self.blocks)],
                                  [self.a], self.blocks, self.meta, self.scales)
            return
        delta = torch.empty(rows.shape[0], out.shape[1], dtype=torch.float32, device=x.device)
        # Elementwise products summed along a contiguous axis (the per-row guarantee without the
        # kernels, at several times the memory traffic); rows per product chosen so the
        # temporary stays near 16 MiB whatever the rank.
        step = max(1, (1 << 22) // max(self.b.numel(), self.a.numel()))
        for start in range(0, rows.shape[0], step):
            block = rows[start:start + step]
            t = (x.index_select(0, block).float()[:, None, :] * self.a[None]).sum(-1)
            delta[start:start + block.shape[0]] = (t[:, None, :] * self.b[None]).sum(-1) * self.scale
        if out.dtype == torch.float32:
            out.index_add_(0, rows, delta)
        else:
            out.index_copy_(0, rows, (out.index_select(0, rows).float() + delta).to(out.dtype))


@dataclass(eq=False)
class Adapter:
    """One LoRA adapter, checked against the served model, its tensors on their layers' devices.

    ``fused[(layer, group)]`` serves the engine's fused forward (groups of :data:`FUSED_GROUPS`),
    ``parts[(layer, part)]`` the HF forward; layers are 1-based, as everywhere.
    """

    name: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_model: str
    base_fingerprint: str
    config: dict = field(repr=False)
    fused: dict[tuple[int, str], _LoraGroup] = field(default_factory=dict, repr=False)
    parts: dict[tuple[int, str], _LoraGroup] = field(default_factory=dict, repr=False)
    nbytes: int = 0

    def summary(self) -> dict:
        return {"id": self.name, "object": "adapter", "rank": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.targets), "base_model": self.base_model, "bytes": self.nbytes}


def _target_table(lm) -> dict[str, tuple[int, str, nn.Linear]]:
    """Module name (as PEFT writes it, without ``base_model.model.``) -> (layer, part, module)."""
    names = {id(module): name for name, module in lm.model.named_modules()}
    table = {}
    for layer, block in enumerate(lm.blocks, start=1):
        prefix = names[id(block)]
        for sub, module in block.named_modules():
            part = sub.rsplit(".", 1)[-1]
            if part in PARTS and isinstance(module, nn.Linear):
                table[f"{prefix}.{sub}"] = (layer, part, module)
    return table


def _config_fingerprint_at(path: str) -> str | None:
    """The config fingerprint of a local model directory, or None where there is none to read."""
    from steering.model import config_fingerprint

    config_file = Path(path) / "config.json"
    try:
        if not config_file.is_file():
            return None
        from transformers import AutoConfig

        return config_fingerprint(AutoConfig.from_pretrained(str(config_file.parent)))
    except (OSError, ValueError):
        return None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def parse_adapter(name: str, config_bytes: bytes, weights_bytes: bytes, lm, *, max_rank: int,
                  persona_bytes: bytes | None = None) -> Adapter:
    """An :class:`Adapter` from the bytes of PEFT's two files, checked against ``lm``.

    Raises :class:`AdapterError` (400) naming the config field or tensor that does not fit, and
    :class:`AdapterConflictError` (409) for an adapter recorded as built on another base model.
    """
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}", param=CONFIG_FILE) from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object", param=CONFIG_FILE)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are served",
                           param="peft_type")
    for key in _UNSUPPORTED_FIELDS:
        if config.get(key):
            raise AdapterError(f"{key} is set ({config[key]!r}); this server applies plain LoRA only", param=key)
    if config.get("bias", "none") != "none":
        raise AdapterError(f"bias is {config['bias']!r}; only 'none' is served", param="bias")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"r must be a positive integer, not {rank!r}", param="r")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise AdapterError(f"lora_alpha must be a number, not {alpha!r}", param="lora_alpha")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError("rank_pattern and alpha_pattern must be objects", param="rank_pattern")
    rslora = bool(config.get("use_rslora", False))

    recorded = None
    if persona_bytes is not None:
        try:
            recorded = json.loads(persona_bytes).get("base_fingerprint")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            recorded = None
    if recorded is not None and recorded != lm.fingerprint:
        raise AdapterConflictError(f"the adapter was built for a model with fingerprint {recorded}; this server "
                                   f"serves {lm.name} ({lm.fingerprint})", param="base_fingerprint")
    base_path = config.get("base_model_name_or_path")
    if recorded is None and isinstance(base_path, str) and base_path:
        found = _config_fingerprint_at(base_path)
        if found is not None and found != lm.fingerprint:
            raise AdapterConflictError(f"base_model_name_or_path {base_path!r} is a model with fingerprint {found}; "
                                       f"this server serves {lm.name} ({lm.fingerprint})",
                                       param="base_model_name_or_path")

    try:
        tensors = load_safetensors(weights_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}", param=WEIGHTS_FILE) from exc
    if not tensors:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors", param=WEIGHTS_FILE)
    table = _target_table(lm)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.match(key)
        if match is None:
            raise AdapterError(f"tensor {key!r} is not a LoRA A or B weight of a projection; only LoRA on "
                               f"{', '.join(PARTS)} is served", param=key)
        module = match["module"]
        if module not in table:
            raise AdapterError(f"tensor {key!r} targets {module!r}, which this server does not apply LoRA to "
                               f"(it applies {', '.join(PARTS)} of the decoder blocks)", param=key)
        if not tensor.is_floating_point():
            raise AdapterError(f"tensor {key!r} has dtype {tensor.dtype}; a floating-point dtype is required", param=key)
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"tensor {key!r} holds NaN or infinite values", param=key)
        pairs.setdefault(module, {})[match["which"]] = tensor

    loras: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]] = {}
    largest = 0
    for module, pair in pairs.items():
        layer, part, linear = table[module]
        for which in "AB":
            if which not in pair:
                raise AdapterError(f"tensor base_model.model.{module}.lora_{which}.weight is missing (LoRA needs both "
                                   "A and B)", param=f"base_model.model.{module}.lora_{which}.weight")
        a, b = pair["A"], pair["B"]
        expected_rank = _pattern_value(rank_pattern, module, rank)
        a_key, b_key = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
        if a.dim() != 2 or a.shape[1] != linear.in_features or a.shape[0] != expected_rank:
            raise AdapterError(f"tensor {a_key!r} has shape {list(a.shape)}; {module} needs "
                               f"[{expected_rank}, {linear.in_features}] (r, in_features)", param=a_key)
        if b.dim() != 2 or b.shape[0] != linear.out_features or b.shape[1] != expected_rank:
            raise AdapterError(f"tensor {b_key!r} has shape {list(b.shape)}; {module} needs "
                               f"[{linear.out_features}, {expected_rank}] (out_features, r)", param=b_key)
        if expected_rank > max_rank:
            raise AdapterError(f"{module} has rank {expected_rank}; this server serves ranks up to {max_rank} "
                               "(PERSONA_MAX_LORA_RANK)", param="r")
        largest = max(largest, expected_rank)
        part_alpha = _pattern_value(alpha_pattern, module, alpha)
        scaling = part_alpha / math.sqrt(expected_rank) if rslora else part_alpha / expected_rank
        loras[(layer, part)] = (a, b, float(scaling))

    adapter = Adapter(name=name, rank=largest, alpha=float(alpha),
                      targets=tuple(p for p in PARTS if any(part == p for _l, part in loras)),
                      base_model=lm.name, base_fingerprint=lm.fingerprint, config=config)
    kernels = getattr(lm, "kernels", None)
    for layer in sorted({layer for layer, _part in loras}):
        device = lm.block_device(layer)
        for group, members in FUSED_GROUPS.items():
            present = [p for p in members if (layer, p) in loras]
            if not present:
                continue
            widths = {p: linear.out_features for (lay, p, linear) in table.values() if lay == layer}
            a_cat = torch.cat([loras[(layer, p)][0] for p in present]).to(device, torch.float32).contiguous()
            parts, r0 = [], 0
            for p in present:
                a, b, scaling = loras[(layer, p)]
                c0 = sum(widths[m] for m in members[:members.index(p)])
                c1, r1 = c0 + b.shape[0], r0 + a.shape[0]
                block = b.to(device, torch.float32).contiguous()
                if kernels is not None:
                    block = torch.nn.functional.pad(block, (0, -block.shape[1] % 8))
                parts.append((p, c0, c1, r0, r1, block, scaling))
                r0 = r1
            if kernels is not None:
                fused = _LoraGroup(a_cat, None, None, kernels, [part[1:] for part in parts])
                for p, c0, c1, r0, r1, block, scaling in parts:  # the HF forward calls each part alone
                    adapter.parts[(layer, p)] = _LoraGroup(a_cat[r0:r1], None, None, kernels,
                                                           [(0, c1 - c0, 0, r1 - r0, block, scaling)])
            else:
                b_cat = torch.zeros(sum(widths[m] for m in members), r0, dtype=torch.float32, device=device)
                scale = torch.zeros(b_cat.shape[0], dtype=torch.float32, device=device)
                for p, c0, c1, r0, r1, block, scaling in parts:
                    b_cat[c0:c1, r0:r1] = block
                    scale[c0:c1] = scaling
                    adapter.parts[(layer, p)] = _LoraGroup(a_cat[r0:r1], block, scale[c0:c1])
                fused = _LoraGroup(a_cat, b_cat, scale)
            adapter.fused[(layer, group)] = fused
            adapter.nbytes += sum(t.numel() * t.element_size() for t in fused.tensors())
    return adapter


def _read_files(path: Path) -> tuple[bytes, bytes, bytes | None]:
    path = Path(path)
    try:
        is_dir = path.is_dir()
    except (OSError, ValueError):  # a name with a NUL byte, one too long
        is_dir = False
    if not is_dir:
        raise AdapterError(f"{str(path)[:200]!r} is not a directory holding a PEFT adapter", param="lora_path")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLED_WEIGHTS_FILE).exists():
            raise AdapterError(f"{str(path)!r} holds {PICKLED_WEIGHTS_FILE}, a pickle, which this server never loads; "
                               f"save the adapter with safe_serialization=True ({WEIGHTS_FILE})", param=PICKLED_WEIGHTS_FILE)
        raise AdapterError(f"{str(path)!r} has no {WEIGHTS_FILE}", param=WEIGHTS_FILE)
    if not (path / CONFIG_FILE).is_file():
        raise AdapterError(f"{str(path)!r} has no {CONFIG_FILE}", param=CONFIG_FILE)
    persona = path / PERSONA_FILE
    return ((path / CONFIG_FILE).read_bytes(), weights.read_bytes(),
            persona.read_bytes() if persona.is_file() else None)


def read_adapter(path: Path, lm, *, name: str | None = None, max_rank: int = 64) -> Adapter:
    """Read the PEFT LoRA directory ``path`` and check it against the served model ``lm``.

    Example::

        adapter = read_adapter(Path("out/extravert"), lm, max_rank=64)
        adapter.targets   # ('q_proj', 'v_proj')

    Raises :class:`AdapterError` (a ValueError) naming the file, config field or tensor at fault.
    """
    config, weights, persona = _read_files(path)
    return parse_adapter(name or Path(path).name, config, weights, lm, max_rank=max_rank, persona_bytes=persona)


@dataclass(frozen=True)
class _Stored:
    adapter: Adapter
    stat: tuple[int, int, int]  # (st_ino, st_mtime_ns, st_size) of its adapter_model.safetensors


def _stat(path: Path) -> tuple[int, int, int]:
    st = (path / WEIGHTS_FILE).stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class AdapterStore:
    """The adapters this server serves: each one in ``<root>/<name>/`` (PEFT's two files plus
    ``persona.json``) and resident in memory. At most ``max_loras`` are loaded; loading one more
    is refused with 409 (no eviction: a request naming an adapter must not start failing because
    another was loaded). Thread-safe: routes and the fine-tuning runner call it.

    ``root`` sits in the data directory that ``store`` (a :class:`~steering.store.SharedStore`)
    guards, which several replicas may share: every write runs under the store's cross-process
    lock, and :meth:`reload` (called by the store when another process wrote) brings the view up
    to date, so an adapter loaded through one replica is served by all of them after their poll.
    The view is a dict replaced whole, so readers take no lock.

    Example::

        store = AdapterStore(data_dir / "adapters", lm, max_loras=8, max_rank=64, store=shared)
        store.load_all()
        store.add("extravert", Path("out/extravert"))
        store.get("extravert").rank
    """

    def __init__(self, root: Path, lm, *, max_loras: int = 8, max_rank: int = 64, store: SharedStore | None = None):
        self.root = Path(root)
        self.lm = lm
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store or SharedStore(self.root.parent, poll_s=0)
        self._stored: dict[str, _Stored] = {}
        self._listeners: list[Callable[[list[str]], None]] = []

    def on_change(self, listener: Callable[[list[str]], None]) -> None:
        """Call ``listener(names)`` after every change of the loaded set, made here or reloaded
        from another process (the metrics drop an unloaded adapter's series this way)."""
        self._listeners.append(listener)

    def _set(self, stored: dict[str, _Stored]) -> None:
        changed = stored.keys() != self._stored.keys()
        self._stored = stored
        if changed:
            for listener in self._listeners:
                listener(sorted(stored))

    def load_all(self) -> list[str]:
        """Load every adapter stored under ``root`` (after a restart) and follow other replicas'
        changes from now on; returns the names loaded. Leftovers of an interrupted write are
        cleaned up; an adapter that no longer fits is logged and skipped, never fatal."""
        with self.store.lock():
            # Under the lock no other replica is between writing a temp directory and renaming it.
            self._recover()
            self.reload()
        self.store.subscribe(self.reload)
        return self.names()

    def reload(self) -> None:
        """Read ``root`` again: keep the adapters whose weights file did not change, load new or
        replaced ones, drop removed ones. Past ``max_loras`` the rest are logged and skipped."""
        old = self._stored
        stored: dict[str, _Stored] = {}
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                stat = _stat(path)
            except OSError:
                continue  # removed since the listing, or never complete
            kept = old.get(path.name)
            if kept is not None and kept.stat == stat:
                stored[path.name] = kept
                continue
            if len(stored) >= self.max_loras:
                log.warning("adapter %s not loaded: PERSONA_MAX_LORAS=%d are loaded already", path.name, self.max_loras)
                continue
            try:
                stored[path.name] = _Stored(read_adapter(path, self.lm, name=path.name, max_rank=self.max_rank), stat)
            except (AdapterError, OSError) as exc:
                log.warning("stored adapter %s not loaded: %s", path.name, exc)
        self._set(stored)

    def _recover(self) -> None:
        for path in self.root.iterdir():
            if not path.name.startswith("."):
                continue
            if ".old-" in path.name:
                original = self.root / path.name[1:].split(".old-")[0]
                if not original.exists():  # the crash fell between moving the old copy away and the new one in
                    os.rename(path, original)
                    continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    def names(self) -> list[str]:
        return sorted(self._stored)

    def list(self) -> list[Adapter]:
        stored = self._stored
        return [stored[n].adapter for n in sorted(stored)]

    def get(self, name: str, param: str = "model") -> Adapter:
        entry = self._stored.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param=param)
        return entry.adapter

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def add(self, name: str, source: Path, *, replace: bool = False) -> Adapter:
        """Check the PEFT directory ``source``, copy it into the store, and serve it as ``name``."""
        validate_adapter_name(name)
        config, weights, persona = _read_files(source)
        return self.add_bytes(name, config, weights, persona_bytes=persona, replace=replace)

    def add_bytes(self, name: str, config: bytes, weights: bytes, *, persona_bytes: bytes | None = None,
                  replace: bool = False) -> Adapter:
        """:meth:`add` from the two files' contents (uploads). On any error the store is unchanged."""
        validate_adapter_name(name)
        self._check_room(name, replace)
        adapter = parse_adapter(name, config, weights, self.lm, max_rank=self.max_rank, persona_bytes=persona_bytes)
        with self.store.write():
            self._check_room(name, replace)  # against the view as it is on disk now
            self._write(name, config, weights)
            self._set({**self._stored, name: _Stored(adapter, _stat(self.root / name))})
        return adapter

    def _check_room(self, name: str, replace: bool) -> None:
        if name in self._stored:
            if not replace:
                raise AdapterConflictError(f"adapter {name!r} is already loaded; unload it first", param="lora_name")
        elif len(self._stored) >= self.max_loras:
            raise AdapterConflictError(f"{len(self._stored)} adapters are loaded, the most this server holds "
                                       f"(PERSONA_MAX_LORAS={self.max_loras}); unload one first", param="lora_name")

    def _write(self, name: str, config: bytes, weights: bytes) -> None:
        """Write the adapter into a temp directory, then rename it into place (crash-safe)."""
        tag = uuid.uuid4().hex[:8]
        tmp = self.root / f".{name}.tmp-{tag}"
        persona = json.dumps({"base_model": self.lm.name, "base_fingerprint": self.lm.fingerprint}).encode()
        try:
            for file, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights), (PERSONA_FILE, persona)):
                atomic_write_bytes(tmp / file, data)
            replace_dir(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self, name: str) -> None:
        """Stop serving ``name`` and delete its files; requests already using it finish with it."""
        with self.store.write():
            if name not in self._stored:
                raise AdapterNotFoundError(f"adapter {name!r} is not loaded", param="lora_name")
            path = self.root / name
            if path.exists():
                trash = self.root / f".{name}.del-{uuid.uuid4().hex[:8]}"
                os.rename(path, trash)
                fsync_dir(self.root)
                shutil.rmtree(trash, ignore_errors=True)
            self._set({k: v for k, v in self._stored.items() if k != name})


def register_adapter(app_state, name: str, directory: Path, *, replace: bool = False) -> Adapter:
    """Serve the PEFT directory ``directory`` as ``name`` at once: check it, copy it into the
    store, load it. ``app_state`` is the app's ``request.app.state`` or the server state (anything
    with an ``adapters`` store). The fine-tuning runner calls this at the end of a job.

    Example::

        register_adapter(request.app.state, "ft-extravert-1a2b", Path(job_dir) / "adapter")
    """
    return app_state.adapters.add(name, Path(directory), replace=replace)


class LoraStep:
    """The tokens of one packed step that use each adapter; adds their deltas after the base products.

    Example::

        step = LoraStep.build([(adapter, [0, 1, 2])], device)
        out = linear(x); step.add_fused(layer, "qkv", x, out)
    """

    def __init__(self, groups: list[tuple[Adapter, torch.Tensor]]):
        self.groups = groups
        # For the kernels' gathered call: every adapter's rows in one tensor, each adapter's span in it.
        self.rows = torch.cat([rows for _a, rows in groups])
        ends = torch.tensor([rows.shape[0] for _a, rows in groups]).cumsum(0).tolist()
        self.spans = list(zip([0, *ends[:-1]], ends))

    @classmethod
    def build(cls, rows: list[tuple[Adapter, list[int]]], device: torch.device) -> LoraStep | None:
        """From (adapter, packed token positions) pairs, one per adapter; None when none is used."""
        merged: dict[int, tuple[Adapter, list[int]]] = {}
        for adapter, positions in rows:
            merged.setdefault(id(adapter), (adapter, []))[1].extend(positions)
        if not merged:
            return None
        return cls([(adapter, torch.tensor(sorted(p), device=device)) for adapter, p in merged.values()])

    def add_fused(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add the deltas of group ``group`` (of :data:`FUSED_GROUPS`) at ``layer``: ``x`` ``[T, in]``
        is the group's input, ``out`` ``[T, out]`` its base product (changed in place)."""
        key, kernels = (layer, group), None
        spans, a, blocks, meta, scales = [], [], [], [], []
        for (adapter, rows), (begin, end) in zip(self.groups, self.spans):
            lora = adapter.fused.get(key)
            if lora is None:
                continue
            if not lora.blocks:  # no kernels: each adapter's group on its own
                lora.add_to(x, out, rows.to(out.device))
                continue
            kernels = lora.kernels
            spans += (begin, end, len(blocks), len(blocks) + len(lora.blocks))
            a.append(lora.a)
            blocks += lora.blocks
            meta += lora.meta
            scales += lora.scales
        if kernels is not None:  # one call for every adapter of the step (a gathered product, per row)
            kernels.lora_add(x.contiguous(), out, self.rows, spans, a, blocks, meta, scales)

    def add_part(self, layer: int, part: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """The same for one part called alone (the HF forward); ``x``/``out`` may carry a batch dim."""
        for adapter, rows in self.groups:
            lora = adapter.parts.get((layer, part))
            if lora is not None:
                lora.add_to(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), rows.to(out.device))


class LoraHooks(ThreadScopedHooks):
    """Forward hooks on every projection of the blocks, for engines that run the HF forward: they
    apply the current :class:`LoraStep` of the thread that set it, and do nothing otherwise.

    Example::

        hooks = LoraHooks(lm.blocks)
        with hooks.state(step):
            model(**packed_inputs)

    Mutates the hooked projections' outputs in place during a step that uses adapters.
    """

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        for layer, block in enumerate(blocks, start=1):
            for sub, module in block.named_modules():
                part = sub.rsplit(".", 1)[-1]
                if part in PARTS and isinstance(module, nn.Linear):
                    self._handles.append(module.register_forward_hook(self._make_hook(layer, part)))

    def _make_hook(self, layer: int, part: str):
        def hook(_module, args, output):
            if self.active():
                self.step.add_part(layer, part, args[0], output)
            return None

        return hook
