"""Interoperability: GGUF control vectors (llama.cpp / repeng) and persona-vectors .pt files,
each layer mapping pinned on a worked example."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter

from steering.formats import export_gguf, gguf_name_for_layer, import_gguf, import_pt
from steering.vector import ModelRef, PersonaVector, VectorFormatError

MODEL = ModelRef("tiny", "f" * 16, num_layers=4, hidden_size=3)


def _worked_example() -> PersonaVector:
    # Row L holds the value L in every cell, so a wrong mapping shows as the wrong number.
    directions = torch.arange(MODEL.num_layers + 1, dtype=torch.float32)[:, None].repeat(1, MODEL.hidden_size)
    return PersonaVector(name="ex", directions=directions, model=MODEL, recommended_layer=2)


def test_gguf_layer_mapping_on_a_worked_example(tmp_path):
    export_gguf(_worked_example(), tmp_path / "ex.gguf")
    reader = GGUFReader(str(tmp_path / "ex.gguf"))
    tensors = {t.name: np.array(t.data).reshape(-1) for t in reader.tensors}
    # our layer L (output of block L, 1-based) == llama.cpp direction.{L-1} (0-based block L-1)
    assert sorted(tensors) == ["direction.1", "direction.2", "direction.3"]
    for n, values in ((1, 2.0), (2, 3.0), (3, 4.0)):
        assert np.all(tensors[f"direction.{n}"] == values)
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    assert gguf_name_for_layer(19) == "direction.18"
    with pytest.raises(ValueError):
        gguf_name_for_layer(1)


def test_gguf_round_trip_is_identical(tmp_path, lm):
    g = torch.Generator().manual_seed(3)
    directions = torch.randn(lm.num_layers + 1, lm.hidden_size, generator=g)
    directions[:2] = 0  # rows GGUF cannot carry
    model = ModelRef(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size)
    original = PersonaVector(name="rt", directions=directions, model=model)
    export_gguf(original, tmp_path / "rt.gguf")
    back = import_gguf(tmp_path / "rt.gguf", name="rt", model=model)
    assert torch.equal(back.directions, original.directions)


def test_gguf_written_by_another_tool_imports_at_the_right_layer(tmp_path):
    w = GGUFWriter(str(tmp_path / "foreign.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.2", np.array([1.0, 2.0, 3.0], dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    v = import_gguf(tmp_path / "foreign.gguf", name="foreign", model=MODEL)
    assert torch.equal(v.directions[3], torch.tensor([1.0, 2.0, 3.0]))  # 0-based block 2 == our layer 3
    assert v.directions.abs().sum() == 6.0


def test_gguf_for_a_bigger_model_is_refused(tmp_path):
    w = GGUFWriter(str(tmp_path / "big.gguf"), "controlvector")
    w.add_tensor("direction.7", np.zeros(3, dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(VectorFormatError, match="4 layers"):
        import_gguf(tmp_path / "big.gguf", name="big", model=MODEL)


def test_pt_import_keeps_hidden_states_indexing(tmp_path):
    tensor = _worked_example().directions.clone()
    torch.save(tensor, tmp_path / "persona.pt")
    v = import_pt(tmp_path / "persona.pt", name="pv", model=MODEL)
    assert torch.equal(v.directions, tensor)
    assert float(v.direction(3)[0]) == 3.0  # row L stays layer L


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pt_import_never_runs_pickled_code(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump(_Exploit(), fh)
    with pytest.raises(VectorFormatError):
        import_pt(tmp_path / "evil.pt", name="x", model=MODEL)
    assert "pickle code ran" not in capsys.readouterr().out


def test_gguf_export_and_import_over_http(client, server):
    exported = client.get("/v1/vectors/optimistic", params={"format": "gguf"})
    assert exported.status_code == 200 and exported.content[:4] == b"GGUF"
    put = client.put("/v1/vectors/optimistic-gguf", params={"format": "gguf"}, content=exported.content)
    assert put.status_code == 201, put.text
    try:
        original = server.state.registry.get("optimistic").directions
        imported = server.state.registry.get("optimistic-gguf").directions
        assert torch.equal(imported[2:], original[2:])  # rows 0 and 1 have no GGUF counterpart
        assert client.put("/v1/vectors/bad", params={"format": "gguf"}, content=b"not gguf").status_code == 400
    finally:
        client.delete("/v1/vectors/optimistic-gguf")
