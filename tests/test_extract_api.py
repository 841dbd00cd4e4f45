"""``POST /v1/vectors/extract`` builds a vector as a job; the result lands in the registry."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO_VECTORS, wait_job


@pytest.mark.parametrize("name", ["optimistic", "evil"])
def test_extract_job_builds_a_vector_that_matches_the_shipped_one(client, server, name):
    """`optimistic` has no `extraction` object (written answers, mean difference, layer by Cohen's
    d); `evil`'s, written by `make methods`, asks for PCA, averaging over neighbours and layer 19."""
    data = json.loads((REPO_VECTORS / "traits" / f"{name}.json").read_text())
    r = client.post("/v1/vectors/extract", json={"trait": data, "name": f"{name}-rebuilt", "sweep": False})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] > 0
    shipped = server.state.registry.get(name)
    rebuilt = server.state.registry.get(f"{name}-rebuilt")
    try:
        assert rebuilt.recommended_layer == shipped.recommended_layer
        assert rebuilt.extra.get("extraction") == shipped.extra.get("extraction") or "extraction" not in shipped.extra
        cos = (rebuilt.directions[1:] * shipped.directions[1:]).sum(-1) / (
            rebuilt.directions[1:].norm(dim=-1) * shipped.directions[1:].norm(dim=-1))
        assert float(cos.min()) > 0.999  # same definition, same model: the same vector
        assert rebuilt.source["definition_sha256"] == shipped.source["definition_sha256"]
    finally:
        client.delete(f"/v1/vectors/{name}-rebuilt")


def test_labelled_sentences_job_and_bad_definitions(client, server):
    trait = {
        "name": "tidy", "description": "Keeps things in order versus leaves things in a mess.",
        "pairs": [{"pos": "You love order and plans.", "neg": "You hate plans and leave things messy."}],
        "heldout_questions": ["How do you pack for a trip?", "What does your desk look like?"],
        "sentences": {"pos": ["I label every box before I move.", "My calendar is planned weeks ahead."],
                      "neg": ["I never know where my keys are.", "My plans change every hour or so."]},
    }
    r = client.post("/v1/vectors/extract", json={"trait": trait, "method": "labelled_sentences", "sweep": False})
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert server.state.registry.get("tidy").method == "labelled_sentences"
    client.delete("/v1/vectors/tidy")

    missing = client.post("/v1/vectors/extract", json={"trait": {**trait, "sentences": {}}, "method": "labelled_sentences"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "trait.sentences"
    both = client.post("/v1/vectors/extract", json={"trait": trait, "trait_name": "optimistic"})
    assert both.status_code == 400
    assert client.post("/v1/vectors/extract", json={"trait_name": "no-such-trait"}).status_code == 404
    assert client.get("/v1/jobs/job-nope").status_code == 404


def test_definitions_that_do_not_fit_are_refused_before_a_job_starts(client, server):
    data = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
    context = server.state.engine.max_model_len  # the context within the KV-cache budget
    texts = [{**data["texts"][0], "neg": "x " * context}, *data["texts"][1:]]
    r = client.post("/v1/vectors/extract", json={"trait": {**data, "texts": texts}, "name": "too-long", "sweep": False})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "trait.texts[0].neg" and error["code"] == "prompt_too_long"
    assert str(context) in error["message"]

    pairs = [{**data["pairs"][0], "pos": "x " * (context - 40)}, *data["pairs"][1:]]
    r = client.post("/v1/vectors/extract", json={"trait": {**data, "pairs": pairs}, "method": "contrastive_prompts"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "trait.pairs[0].pos"  # with its 48-token answer

    malformed = client.post("/v1/vectors/extract", json={"trait": {**data, "texts": [1]}})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "trait.texts[0].question"
    assert server.state.registry.names().count("too-long") == 0


def test_contrastive_prompts_job_builds_a_vector_from_the_models_own_answers(client, server):
    """The Persona Vectors method end to end on a small trait: the model answers 4 questions
    under 2 eliciting and 2 opposing system prompts, the vector is the difference of its answers'
    mean states. It must separate held-out prompts and agree with the shipped `optimistic`
    vector, which was built from written answers instead."""
    data = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
    trait = {**data, "pairs": data["pairs"][:2], "questions": data["questions"][:4],
             "heldout_questions": data["heldout_questions"][:6]}
    r = client.post("/v1/vectors/extract", json={"trait": trait, "name": "optimistic-prompts",
                                                 "method": "contrastive_prompts", "sweep": False})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    built = server.state.registry.get("optimistic-prompts")
    shipped = server.state.registry.get("optimistic")
    try:
        assert built.method == "contrastive_prompts"
        assert built.source["n_generated"] == 8 and built.source["n_pos"] == built.source["n_neg"] == 8
        assert built.source["judge"] is None and "no judge" in built.source["note"]
        assert built.extra["heldout_auroc"] >= 0.8, built.extra
        layer = shipped.recommended_layer
        a, b = built.directions[layer], shipped.directions[layer]
        cosine = float(a @ b / (a.norm() * b.norm()))
        print("contrastive_prompts vs shipped optimistic: cosine", round(cosine, 3), "at layer", layer,
              "held-out AUROC", built.extra["heldout_auroc"], "at layer", built.recommended_layer)
        assert cosine > 0.3
    finally:
        client.delete("/v1/vectors/optimistic-prompts")


def test_a_definitions_extraction_object_reaches_the_built_vector(client, server):
    data = json.loads((REPO_VECTORS / "traits" / "optimistic.json").read_text())
    data["extraction"] = {"method": "contrastive_texts", "combine": "pca", "smooth_layers": 1, "layer": 12,
                          "chosen_by": "this test"}
    r = client.post("/v1/vectors/extract", json={"trait": data, "name": "optimistic-pca", "sweep": False})
    job = wait_job(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    vector = server.state.registry.get("optimistic-pca")
    try:
        assert vector.recommended_layer == 12 and vector.method == "contrastive_texts"
        assert vector.extra["extraction"] == {"method": "contrastive_texts", "combine": "pca", "smooth_layers": 1,
                                              "layer": 12, "layer_chosen_by": "this test"}
    finally:
        client.delete("/v1/vectors/optimistic-pca")
    for spec, param in (({"layer": 99}, "trait.extraction.layer"),
                        ({"method": "labelled_sentences", "combine": "pca"}, "trait.extraction.combine")):
        r = client.post("/v1/vectors/extract", json={"trait": {**data, "extraction": spec}, "name": "nope"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
