"""Vector import and export in other tools' formats, each pinned to our layer convention.

**GGUF control vectors** (written by repeng, read by llama.cpp ``--control-vector``): one
float32 tensor ``direction.N`` per layer. llama.cpp adds ``direction.N`` to the output of
0-based block ``N``, which is our layer ``N + 1`` (block ``N + 1`` counted from 1). There is no
``direction.0``: llama.cpp never steers the output of the first block, so our layer 1 cannot
be exported, and row 0 (embeddings) has no GGUF counterpart either.

**persona-vectors .pt** tensors: ``[num_layers + 1, hidden]`` indexed like ``hidden_states``,
the same as ours; loaded with ``torch.load(weights_only=True)`` so no pickled code runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from steering.atomic import atomic_write_bytes
from steering.vector import ModelRef, PersonaVector, VectorFormatError

_DIRECTION = re.compile(r"^direction\.(\d+)$")


def gguf_name_for_layer(layer: int) -> str:
    """Our layer ``L`` (output of 1-based block ``L``) is llama.cpp's ``direction.{L-1}``."""
    if layer < 2:
        raise ValueError("llama.cpp control vectors start at our layer 2 (direction.1)")
    return f"direction.{layer - 1}"


def export_gguf(vector: PersonaVector, path: Path, *, layers: list[int] | None = None, model_hint: str = "llama") -> None:
    """Write ``vector`` as a llama.cpp control vector (atomically). Default: layers 2..L."""
    from gguf import GGUFWriter

    layers = layers or list(range(2, vector.model.num_layers + 1))
    tmp = Path(path).with_suffix(".gguf.part")
    writer = GGUFWriter(str(tmp), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        writer.add_tensor(gguf_name_for_layer(layer), vector.direction(layer).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = tmp.read_bytes()
    tmp.unlink()
    atomic_write_bytes(Path(path), data)


def import_gguf(path: Path, *, name: str, model: ModelRef, description: str = "") -> PersonaVector:
    """Read a llama.cpp / repeng control vector into our layout (missing layers are zero)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises several types for non-GGUF input
        raise VectorFormatError(f"not a readable GGUF file: {exc}") from exc
    directions = torch.zeros(model.num_layers + 1, model.hidden_size)
    found = []
    for tensor in reader.tensors:
        match = _DIRECTION.match(tensor.name)
        if not match:
            continue
        n = int(match.group(1))
        layer = n + 1
        if n < 1 or layer > model.num_layers:
            raise VectorFormatError(f"{tensor.name} does not fit a model with {model.num_layers} layers")
        values = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        if values.numel() != model.hidden_size:
            raise VectorFormatError(f"{tensor.name} has {values.numel()} values, the model's hidden size is {model.hidden_size}")
        if not torch.isfinite(values).all():
            raise VectorFormatError(f"{tensor.name} contains NaN or inf", tensor.name)
        directions[layer] = values
        found.append(layer)
    if not found:
        raise VectorFormatError("the GGUF file holds no direction.N tensors")
    return PersonaVector(name=name, directions=directions, model=model, description=description,
                         method="imported_gguf", source={"file": Path(path).name, "layers": sorted(found)},
                         recommended_layer=None)


def import_pt(path: Path, *, name: str, model: ModelRef, description: str = "") -> PersonaVector:
    """Read a persona-vectors ``.pt`` tensor ``[num_layers + 1, hidden]`` without running pickle code."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VectorFormatError(f"not a loadable tensor file (weights only): {exc}") from exc
    if isinstance(data, dict):
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise VectorFormatError("the .pt file must hold one tensor")
        data = tensors[0]
    if not isinstance(data, torch.Tensor):
        raise VectorFormatError("the .pt file does not hold a tensor")
    return PersonaVector(name=name, directions=data.float(), model=model, description=description,
                         method="imported_pt", source={"file": Path(path).name})
