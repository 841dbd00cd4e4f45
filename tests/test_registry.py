"""The vector registry over HTTP and on disk: upload, list, get, delete, refusals, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from steering.registry import VectorRegistry
from steering.vector import (
    ModelRef,
    PersonaVector,
    VectorFormatError,
    VectorModelMismatchError,
)


def _vector(lm, name="probe", scale=1.0, fingerprint=None, layers=None, hidden=None) -> PersonaVector:
    n_layers, hid = layers or lm.num_layers, hidden or lm.hidden_size
    g = torch.Generator().manual_seed(7)
    return PersonaVector(
        name=name,
        directions=scale * torch.randn(n_layers + 1, hid, generator=g),
        model=ModelRef(lm.name, fingerprint or lm.fingerprint, n_layers, hid),
        description="a random test direction",
        recommended_layer=10,
        coefficient_range=(0.5, 2.0),
    )


def test_upload_list_get_download_delete_safetensors(client, lm):
    vector = _vector(lm, "probe-st")
    put = client.put("/v1/vectors/probe-st", content=vector.to_bytes(), headers={"content-type": "application/octet-stream"})
    assert put.status_code == 201, put.text
    assert put.json()["recommended_layer"] == 10
    assert "probe-st" in [v["id"] for v in client.get("/v1/vectors").json()["data"]]
    got = client.get("/v1/vectors/probe-st").json()
    assert got["model"]["fingerprint"] == lm.fingerprint
    assert len(got["layer_norms"]) == lm.num_layers + 1
    downloaded = PersonaVector.from_bytes(client.get("/v1/vectors/probe-st", params={"format": "safetensors"}).content)
    assert torch.equal(downloaded.directions, vector.directions)
    again = client.put("/v1/vectors/probe-st", content=vector.to_bytes())
    assert again.status_code == 200  # replaced, not created
    assert client.delete("/v1/vectors/probe-st").json()["deleted"] is True
    assert client.get("/v1/vectors/probe-st").status_code == 404
    assert client.delete("/v1/vectors/probe-st").status_code == 404


def test_uploaded_json_vector_steers_generation(client, lm, server):
    optimistic = server.state.registry.get("optimistic")
    body = {"directions": optimistic.directions.tolist(), "recommended_layer": optimistic.recommended_layer,
            "description": "a copy of optimistic"}
    assert client.put("/v1/vectors/copy-of-optimistic", json=body).status_code == 201
    try:
        msgs = [{"role": "user", "content": "Describe your morning."}]
        base = {"model": "default", "messages": msgs, "temperature": 0, "max_tokens": 20}
        a = client.post("/v1/chat/completions", json={**base, "steering": {"copy-of-optimistic": 2.0}}).json()
        b = client.post("/v1/chat/completions", json={**base, "steering": {"optimistic": 2.0}}).json()
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    finally:
        client.delete("/v1/vectors/copy-of-optimistic")


def test_wrong_shape_is_refused(client, lm):
    short = {"directions": [[0.0] * lm.hidden_size] * lm.num_layers}  # one row missing
    response = client.put("/v1/vectors/bad-shape", json=short)
    assert response.status_code == 400
    assert "expected" in response.json()["error"]["message"]
    ragged = {"directions": [[0.0] * 3, [0.0] * 4]}
    assert client.put("/v1/vectors/bad-shape", json=ragged).json()["error"]["param"] == "directions"
    assert client.put("/v1/vectors/bad-shape", content=b"not safetensors").status_code == 400
    assert client.get("/v1/vectors/bad-shape").status_code == 404


def test_vector_for_another_model_is_refused_with_409(client, lm):
    other = _vector(lm, "alien", fingerprint="0123456789abcdef")
    response = client.put("/v1/vectors/alien", content=other.to_bytes())
    assert response.status_code == 409
    assert "0123456789abcdef" in response.json()["error"]["message"]
    wider = _vector(lm, "alien", hidden=lm.hidden_size * 2)
    assert client.put("/v1/vectors/alien", content=wider.to_bytes()).status_code == 409


@pytest.mark.parametrize("name", ["..", ".hidden", "a" * 65, "semi;colon", "sp ace"])
def test_bad_names_are_refused(client, lm, name):
    response = client.put(f"/v1/vectors/{name}", content=_vector(lm).to_bytes())
    assert response.status_code in (400, 404)
    assert "error" in response.json()


def test_encoded_path_separator_cannot_escape_the_registry(client, lm, server):
    response = client.put("/v1/vectors/..%2F..%2Fescape", content=_vector(lm).to_bytes())
    assert response.status_code in (400, 404)
    assert not (server.state.registry.directory.parent.parent / "escape.safetensors").exists()


def test_registry_survives_restart(tmp_path, lm):
    reg = VectorRegistry(tmp_path, model_name=lm.name, fingerprint=lm.fingerprint, num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    reg.put(_vector(lm, "kept"))
    reopened = VectorRegistry(tmp_path, model_name=lm.name, fingerprint=lm.fingerprint, num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    assert torch.equal(reopened.get("kept").directions, reg.get("kept").directions)


def test_leftover_temp_file_from_a_crash_is_ignored_and_cleaned(tmp_path, lm):
    reg = VectorRegistry(tmp_path, model_name=lm.name, fingerprint=lm.fingerprint, num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    reg.put(_vector(lm, "kept"))
    half = _vector(lm, "kept", scale=3.0).to_bytes()
    (tmp_path / ".kept.safetensors.abc123.tmp").write_bytes(half[: len(half) // 2])
    reopened = VectorRegistry(tmp_path, model_name=lm.name, fingerprint=lm.fingerprint, num_layers=lm.num_layers, hidden_size=lm.hidden_size)
    assert torch.equal(reopened.get("kept").directions, reg.get("kept").directions)
    assert not list(tmp_path.glob(".*.tmp"))


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from steering.registry import VectorRegistry
    from steering.vector import ModelRef, PersonaVector
    directory, fp, layers, hidden = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    reg = VectorRegistry(directory, model_name="m", fingerprint=fp, num_layers=layers, hidden_size=hidden)
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        reg.put(PersonaVector(name="busy", directions=torch.full((layers + 1, hidden), float(i)),
                              model=ModelRef("m", fp, layers, hidden)))
""")


def test_kill_9_during_writes_leaves_a_readable_registry(tmp_path, lm):
    """A writer killed at random moments never leaves a torn vector file."""
    layers, hidden = 30, 4096  # large rows so a kill often lands mid-write
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    directory = tmp_path / "reg"
    root = Path(__file__).resolve().parents[1]
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, str(script), str(directory), "f" * 16, str(layers), str(hidden)],
                                stdout=subprocess.PIPE, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.07 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        reg = VectorRegistry(directory, model_name="m", fingerprint="f" * 16, num_layers=layers, hidden_size=hidden)
        if "busy" in reg:
            d = reg.get("busy").directions
            assert torch.all(d == d[0, 0]), "a vector file mixes two writes"
        for path in directory.glob("*.safetensors"):
            PersonaVector.load(path)  # every file on disk parses
        assert not list(directory.glob(".*.tmp"))


def test_vector_metadata_round_trips_and_checks_model(lm):
    v = _vector(lm, "rt")
    back = PersonaVector.from_bytes(v.to_bytes())
    assert back.metadata() == v.metadata()
    with pytest.raises(VectorModelMismatchError):
        back.check_model("other", "ffffffffffffffff", lm.num_layers, lm.hidden_size)
    with pytest.raises(VectorFormatError):
        PersonaVector(name="x", directions=torch.full((lm.num_layers + 1, lm.hidden_size), float("nan")),
                      model=ModelRef(lm.name, lm.fingerprint, lm.num_layers, lm.hidden_size))
