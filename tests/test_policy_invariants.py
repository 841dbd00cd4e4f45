"""Rules that must hold whatever order admins and clients act in: every enforced monitor keeps
steering out of its reading, the registry and the monitors never disagree, no vector file
carries NaN or inf, and monitor thresholds reach only those who may read them."""

from __future__ import annotations

import io
import json
import math

import httpx
import numpy as np
import pytest
import torch

from steering.monitor import MonitorConfig, MonitorSet
from steering.registry import VectorInUseError, VectorRegistry
from steering.vector import ModelRef, PersonaVector
from tests.conftest import REPO_VECTORS, make_server

ADMIN = {"Authorization": "Bearer admin-secret"}
USER = {"Authorization": "Bearer user-secret"}
METRICS = {"Authorization": "Bearer metrics-secret"}


@pytest.fixture(scope="module")
def live(lm, tmp_path_factory):
    with make_server(lm, tmp_path_factory.mktemp("invariants"), admin_keys=["admin-secret"],
                     api_keys=["user-secret"], metrics_keys=["metrics-secret"]) as server:
        yield server


@pytest.fixture()
def admin(live):
    with httpx.Client(base_url=live.url, timeout=120, headers=ADMIN) as client:
        yield client
        for m in client.get("/v1/monitors").json()["data"]:
            client.delete(f"/v1/monitors/{m['vector']}")


def ask(live, **fields) -> httpx.Response:
    body = {"model": "default", "messages": [{"role": "user", "content": "How was your day?"}], "max_tokens": 2,
            "temperature": 0, **fields}
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, headers=USER, timeout=120)


def _copy(live, name: str, *, stats: dict | None = None) -> PersonaVector:
    source = live.state.registry.get("optimistic")
    return PersonaVector(name=name, directions=source.directions.clone(), model=source.model,
                         recommended_layer=source.recommended_layer,
                         stats={k: v.clone() for k, v in source.stats.items()} if stats is None else stats)


def test_every_enforced_monitor_holds_against_prompt_steering_below_it(live, admin):
    """Two enforced monitors (layers 11 and 22): steering between them changes what the upper one reads."""
    for vector, layer in (("evil", 11), ("optimistic", 22)):
        r = admin.put(f"/v1/monitors/{vector}", json={"mode": "enforce", "layer": layer, "block_threshold": 1e6})
        assert r.status_code == 200, r.text
    for layer, reads in ((16, "'optimistic' reads at layer 22"), (5, "'evil' reads at layer 11")):
        for positions in ("all", "prompt"):
            refused = ask(live, steering=[{"vector": "humorous", "coefficient": 2.0, "layers": [layer],
                                           "positions": positions}])
            assert refused.status_code == 403, (layer, positions, refused.text)
            error = refused.json()["error"]
            assert error["code"] == "steering_not_allowed" and error["param"] == "steering[0].layers"
            assert reads in error["message"]
    # The entry that reaches below is the one named, whatever its place in the list.
    second = ask(live, steering=[{"vector": "humorous", "coefficient": 1.0, "layers": [22]},
                                 {"vector": "humorous", "coefficient": 1.0, "layers": [23, 16]}])
    assert second.status_code == 403 and second.json()["error"]["param"] == "steering[1].layers"
    for allowed in ([{"vector": "humorous", "coefficient": 2.0, "layers": [22, 25]}],
                    [{"vector": "humorous", "coefficient": 2.0, "layers": [16], "positions": "response"}]):
        assert ask(live, steering=allowed).status_code == 200, allowed
    # Annotate mode reads but never blocks, so it does not restrict steering.
    assert admin.put("/v1/monitors/optimistic", json={"mode": "annotate", "layer": 22}).status_code == 200
    assert ask(live, steering=[{"vector": "humorous", "coefficient": 2.0, "layers": [16]}]).status_code == 200


def test_a_monitor_write_landing_mid_admission_cannot_let_steering_past_it(live, admin, monkeypatch):
    """A request is admitted against the monitors that will read it: an admin write (another
    thread, or another replica through the store) that lands while the request is being built
    must not leave it steered below a monitor its snapshot enforces."""
    monitors = live.state.monitors
    read = monitors.snapshot

    def write_lands_then_read():
        monkeypatch.setattr(monitors, "snapshot", read)  # only the first read races with the write
        monitors.put(MonitorConfig(vector="optimistic", mode="enforce", layer=22, block_threshold=1e6), who="test")
        return read()

    monkeypatch.setattr(monitors, "snapshot", write_lands_then_read)
    raced = ask(live, steering=[{"vector": "humorous", "coefficient": 2.0, "layers": [16]}])
    assert raced.status_code == 403, raced.text
    assert "'optimistic' reads at layer 22" in raced.json()["error"]["message"]


def test_a_vector_write_a_monitor_cannot_read_is_refused_and_chat_keeps_working(live, admin):
    """PUT (JSON, GGUF, .pt, safetensors without statistics) and DELETE under a z-score monitor: 409 naming it."""
    name = "watched"
    assert admin.put(f"/v1/vectors/{name}", content=_copy(live, name).to_bytes()).status_code == 201
    assert admin.put(f"/v1/monitors/{name}", json={"mode": "enforce", "score": "z", "block_threshold": 1e6}).status_code == 200
    vector = live.state.registry.get(name)
    gguf = admin.get(f"/v1/vectors/{name}", params={"format": "gguf"}).content
    pt = io.BytesIO()
    torch.save(vector.directions, pt)
    json_body = {"directions": vector.directions.tolist(), "recommended_layer": vector.recommended_layer}
    writes = [
        admin.put(f"/v1/vectors/{name}", json=json_body),
        admin.put(f"/v1/vectors/{name}", params={"format": "gguf"}, content=gguf),
        admin.put(f"/v1/vectors/{name}", params={"format": "pt"}, content=pt.getvalue()),
        admin.put(f"/v1/vectors/{name}", content=_copy(live, name, stats={}).to_bytes()),
        admin.delete(f"/v1/vectors/{name}"),
    ]
    for r in writes:
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "vector_in_use" and f"monitor on '{name}'" in error["message"]
    assert live.state.registry.get(name) is vector  # nothing was written
    scored = ask(live, monitor={"return_scores": True})
    assert scored.status_code == 200, scored.text
    assert math.isfinite(scored.json()["persona_monitor"]["scores"][name]["z"])
    # A write the monitor can read goes through; so does anything once the monitor no longer needs statistics.
    assert admin.put(f"/v1/vectors/{name}", content=_copy(live, name).to_bytes()).status_code == 200
    assert admin.put(f"/v1/monitors/{name}", json={"mode": "enforce", "score": "projection"}).status_code == 200
    assert admin.put(f"/v1/vectors/{name}", json=json_body).status_code == 200
    assert ask(live, monitor={"return_scores": True}).json()["persona_monitor"]["scores"][name]["z"] is None
    assert admin.delete(f"/v1/monitors/{name}").status_code == 200
    assert admin.delete(f"/v1/vectors/{name}").status_code == 200


def test_the_write_guard_holds_for_every_registry_writer(tmp_path):
    """Extraction jobs and any other code write through the registry; the monitor set's guard sees them all."""
    model = ModelRef("m", "f", 2, 3)
    registry = VectorRegistry(tmp_path / "vectors", model_name="m", fingerprint="f", num_layers=2, hidden_size=3)
    stats = {"neutral_mean": torch.zeros(3), "neutral_std": torch.ones(3)}
    registry.put(PersonaVector(name="v", directions=torch.ones(3, 3), model=model, stats=stats))
    monitors = MonitorSet(tmp_path / "monitors.json", registry, num_layers=2)
    monitors.put(MonitorConfig("v", layer=2, score="z", mode="enforce", block_threshold=3.0), who="test")
    with pytest.raises(VectorInUseError, match="no neutral statistics"):
        registry.put(PersonaVector(name="v", directions=torch.ones(3, 3), model=model))
    zero_at_layer = torch.ones(3, 3)
    zero_at_layer[2] = 0
    with pytest.raises(VectorInUseError, match="zero at layer 2"):
        registry.put(PersonaVector(name="v", directions=zero_at_layer, model=model, stats=stats))
    with pytest.raises(VectorInUseError, match="delete the monitor first"):
        registry.delete("v")
    registry.put(PersonaVector(name="v", directions=torch.eye(3), model=model, stats=stats))
    assert torch.equal(monitors.snapshot().probes[2][0], torch.tensor([0.0, 0.0, 1.0]))  # what it reads now


def test_a_monitor_its_vector_no_longer_fits_is_inactive_not_a_500(lm, tmp_path):
    """State written past the checks (by hand, or by an older server): a z-score monitor on a vector
    without statistics. The server starts, that monitor does not score, chat answers."""
    (tmp_path / "vectors").mkdir()
    optimistic = PersonaVector.load(REPO_VECTORS / lm.name / "optimistic.safetensors")
    optimistic.stats = {}
    optimistic.save(tmp_path / "vectors" / "optimistic.safetensors")
    (tmp_path / "monitors.json").write_text(json.dumps({"monitors": {
        "optimistic": {"vector": "optimistic", "layer": 19, "score": "z", "mode": "enforce", "block_threshold": 1e6},
        "evil": {"vector": "evil", "layer": 19, "score": "z", "mode": "annotate"}}}))
    with make_server(lm, tmp_path) as server:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "monitor": {"return_scores": True}})
        assert r.status_code == 200, r.text
        assert list(r.json()["persona_monitor"]["scores"]) == ["evil"]


def _safetensors_with(live, name: str, tensor: str, index: int, value: float) -> bytes:
    vector = _copy(live, name)
    blob = {"directions": vector.directions.clone(), **{k: v.clone() for k, v in vector.stats.items()}}
    target = blob[tensor]
    target.view(-1)[index] = value
    # Written past PersonaVector's checks, as another tool might write it.
    from safetensors.torch import save
    return save(blob, metadata={"persona_vector": json.dumps(vector.metadata())})


@pytest.mark.parametrize("tensor,value", [("neutral_std", float("nan")), ("neutral_mean", float("inf")),
                                          ("residual_norm", float("nan")), ("directions", float("-inf")),
                                          ("neutral_std", -1.0)])
def test_non_finite_or_negative_statistics_are_refused_naming_the_tensor(live, admin, tensor, value):
    r = admin.put("/v1/vectors/nan-probe", content=_safetensors_with(live, "nan-probe", tensor, 19, value))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == tensor and tensor in error["message"] and error["code"] == "invalid_vector"
    assert "nan-probe" not in live.state.registry


def test_non_finite_values_are_refused_on_every_import_path(live, admin):
    from gguf import GGUFWriter

    hidden = live.state.lm.hidden_size
    path = live.state.settings.data_dir / "nan.gguf"
    writer = GGUFWriter(str(path), "controlvector")
    writer.add_tensor("direction.14", np.full(hidden, np.nan, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gguf = admin.put("/v1/vectors/nan-probe", params={"format": "gguf"}, content=path.read_bytes())
    path.unlink()
    assert gguf.status_code == 400 and gguf.json()["error"]["param"] == "direction.14", gguf.text
    pt = io.BytesIO()
    torch.save(torch.full((live.state.lm.num_layers + 1, hidden), float("inf")), pt)
    loaded = admin.put("/v1/vectors/nan-probe", params={"format": "pt"}, content=pt.getvalue())
    assert loaded.status_code == 400 and loaded.json()["error"]["param"] == "directions", loaded.text
    # float32 is what the server computes in: a float64 value past its range would be inf there.
    body = {"directions": [[1e300] * hidden] * (live.state.lm.num_layers + 1)}
    huge = admin.put("/v1/vectors/nan-probe", json=body)
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "directions", huge.text
    ranged = admin.put("/v1/vectors/nan-probe", content=json.dumps(
        {"directions": [[0.0] * hidden] * (live.state.lm.num_layers + 1), "coefficient_range": ["NaN", 1]}).replace(
        '"NaN"', "NaN"), headers={"content-type": "application/json"})
    assert ranged.status_code == 400 and ranged.json()["error"]["param"] == "coefficient_range", ranged.text
    assert "nan-probe" not in live.state.registry


def test_thresholds_in_metrics_only_for_admin_and_metrics_keys(live, admin):
    assert admin.put("/v1/monitors/evil", json={"mode": "enforce", "flag_threshold": 2.5, "block_threshold": 4.25}).status_code == 200

    def thresholds(headers: dict) -> list[str]:
        text = httpx.get(f"{live.url}/metrics", headers=headers, timeout=30).text
        assert "persona_requests_total" in text  # the rest of the scrape is there for everyone
        return [line for line in text.splitlines() if line.startswith("persona_monitor_threshold")]

    assert thresholds({}) == [] and thresholds(USER) == []
    for headers in (ADMIN, METRICS):
        assert 'persona_monitor_threshold{level="block",vector="evil"} 4.25' in thresholds(headers)
