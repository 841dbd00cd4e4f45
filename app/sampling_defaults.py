"""Sampling defaults for requests that leave a field out, resolved once at startup the way vLLM's
``--generation-config auto`` does: the model directory's ``generation_config.json``, then this
server's recommendation for the embedded default model where the file says nothing, then the
OpenAI defaults; settings (``PERSONA_DEFAULT_*``) and CLI flags override all of them.

The embedded model's converted directory carries no sampling fields, and OpenAI's defaults
(temperature 1.0, up to the context's length) make a 135M model ramble into gibberish, so the
recommendation below was measured for it: short, fluent answers that visibly follow steering."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from app.settings import Settings

log = logging.getLogger(__name__)

FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_tokens")

# OpenAI's defaults (top_k 0 and repetition_penalty 1.0 turn those filters off).
OPENAI = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_tokens": 512}

# Measured on SmolLM2-135M-Instruct with "Describe your morning." and {"optimistic": 1.5}: the
# model card's temperature 0.2 and top_p 0.9; 64 tokens answer in about 4 s on two CPU cores, where
# longer answers start to repeat themselves.
EMBEDDED_RECOMMENDED = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64}

# generation_config.json names max_tokens max_new_tokens (transformers' name).
_FILE_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
              "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each sampling field it leaves out, and where each value came from
    (``settings``, ``generation_config.json``, ``recommended`` or ``openai``).

    ``top_k`` 0 and ``repetition_penalty`` 1.0 mean off.

    Example::

        d = SamplingDefaults(temperature=0.2, top_p=0.9, top_k=0, repetition_penalty=1.0, max_tokens=64)
        d.temperature   # 0.2
    """

    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_tokens: int
    sources: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the startup log: each value with its source."""
        return ", ".join(f"{name} {getattr(self, name):g} ({self.sources.get(name, 'openai')})" for name in FIELDS)


def _valid(name: str, value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if name in ("top_k", "max_tokens"):
        return float(value).is_integer() and value >= (0 if name == "top_k" else 1)
    if name == "temperature":
        return 0.0 <= value <= 2.0
    if name == "top_p":
        return 0.0 < value <= 1.0
    return value > 0.0  # repetition_penalty


def read_generation_config(model_dir: Path | None) -> dict[str, float | int]:
    """The sampling fields of ``model_dir/generation_config.json`` under this server's names;
    fields with unusable values are left out with a warning, a missing file gives ``{}``.

    Example::

        read_generation_config(Path("Llama-3.1-8B-Instruct"))   # {"temperature": 0.6, "top_p": 0.9}
    """
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    found: dict[str, float | int] = {}
    for key, name in _FILE_KEYS.items():
        if key not in raw or raw[key] is None:
            continue
        if _valid(name, raw[key]):
            found[name] = int(raw[key]) if name in ("top_k", "max_tokens") else float(raw[key])
        else:
            log.warning("ignoring %s=%r in %s", key, raw[key], path)
    return found


def resolve_sampling_defaults(settings: Settings, model_dir: Path | None, embedded: bool) -> SamplingDefaults:
    """Resolve every default: settings, else the model's file (with ``generation_config="auto"``),
    else the embedded model's recommendation (``embedded``), else OpenAI's. ``max_tokens`` never
    exceeds ``settings.max_tokens_limit``.

    Example::

        d = resolve_sampling_defaults(Settings(), Path("~/.cache/persona-server/models/..."), embedded=True)
        d.temperature, d.sources["temperature"]   # (0.2, "recommended")
    """
    layers: list[tuple[str, dict]] = [
        ("settings", {name: getattr(settings, f"default_{name}") for name in FIELDS}),
        ("generation_config.json", read_generation_config(model_dir) if settings.generation_config == "auto" else {}),
        ("recommended", EMBEDDED_RECOMMENDED if embedded else {}),
        ("openai", OPENAI),
    ]
    values, sources = {}, {}
    for name in FIELDS:
        source, value = next((src, given[name]) for src, given in layers if given.get(name) is not None)
        values[name], sources[name] = value, source
    values["max_tokens"] = min(values["max_tokens"], settings.max_tokens_limit)
    return SamplingDefaults(**values, sources=sources)
