"""Steering end to end: the server's answers move along the optimistic vector."""

from __future__ import annotations

import asyncio
import concurrent.futures

import torch

from steering.extract import answer_projection, unit_rows
from steering.runner import EngineRunner
from tests.conftest import answer

PROMPTS = ["Describe your morning.", "How do you feel about the next year?", "Tell me about your job."]


def test_coefficient_zero_is_token_identical_to_no_steering(client):
    for prompt in PROMPTS:
        plain = answer(client, prompt, max_tokens=32)
        zero = answer(client, prompt, max_tokens=32, steering=[{"vector": "optimistic", "coefficient": 0.0, "layers": [19]}])
        assert zero == plain


def test_positive_and_negative_coefficients_give_different_answers(client):
    for prompt in PROMPTS:
        up = answer(client, prompt, steering={"optimistic": 2.0})
        down = answer(client, prompt, steering={"optimistic": -2.0})
        assert up != down


def test_steered_answers_project_higher_on_the_vector(client, lm, server):
    """Mean projection of the generated answers (read by the unsteered model) rises with +c."""
    vector = server.state.registry.get("optimistic")
    layer = vector.recommended_layer
    runner = EngineRunner(server.state.engine)

    def projection(prompt: str, coefficient: float) -> float:
        text = answer(client, prompt, max_tokens=40, steering={"optimistic": coefficient})
        return asyncio.run(answer_projection(runner, lm.tokenizer, [prompt], [text], unit_rows(vector.directions), layer))

    up = [projection(p, 2.0) for p in PROMPTS]
    down = [projection(p, -2.0) for p in PROMPTS]
    assert sum(up) / len(up) > sum(down) / len(down)
    assert sum(u > d for u, d in zip(up, down)) >= 2


def test_entries_add_up(client):
    twice = answer(client, PROMPTS[0], steering=[{"vector": "optimistic", "coefficient": 1.0}] * 2)
    double = answer(client, PROMPTS[0], steering={"optimistic": 2.0})
    single = answer(client, PROMPTS[0], steering={"optimistic": 1.0})
    assert twice == double
    assert double != single


def test_response_positions_leave_the_first_token_alone(client):
    """Steering only generated positions cannot change the token predicted from the prompt."""
    plain = answer(client, PROMPTS[0], max_tokens=1)
    steered = answer(client, PROMPTS[0], max_tokens=1,
                     steering=[{"vector": "optimistic", "coefficient": -4.0, "positions": "response"}])
    full = answer(client, PROMPTS[0], max_tokens=1,
                  steering=[{"vector": "optimistic", "coefficient": -4.0, "positions": "all"}])
    assert steered == plain
    assert full != plain


def test_unit_and_residual_units_scale_the_direction(client, server):
    vector = server.state.registry.get("optimistic")
    layer = vector.recommended_layer
    norm = float(vector.direction(layer).norm())
    raw = answer(client, PROMPTS[0], steering=[{"vector": "optimistic", "coefficient": 2.0, "layers": [layer]}])
    unit = answer(client, PROMPTS[0], steering=[{"vector": "optimistic", "coefficient": 2.0 * norm, "layers": [layer], "unit": "unit"}])
    assert unit == raw
    residual_norm = float(vector.stats["residual_norm"][layer])
    residual = answer(client, PROMPTS[0], steering=[
        {"vector": "optimistic", "coefficient": 2.0 * norm / residual_norm, "layers": [layer], "unit": "residual"}
    ])
    assert residual == raw


def test_a_request_never_sees_another_requests_steering(client):
    """Concurrent rows with strong, different steering leave an unsteered row's answer as it is alone."""
    alone = answer(client, PROMPTS[1], max_tokens=32)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        others = [pool.submit(answer, client, PROMPTS[i % 3], max_tokens=32, steering={"optimistic": c})
                  for i, c in enumerate((4.0, -4.0, 3.0, -3.0, 2.5))]
        mine = pool.submit(answer, client, PROMPTS[1], max_tokens=32)
        steered = [f.result() for f in others]
    assert mine.result() == alone
    assert len(set(steered)) > 1


def test_hooks_add_exactly_the_delta_to_each_row(lm):
    """The hook adds table[index[token]] to every token (row 0 of the table is zeros), so each row
    gets its own delta and a row pointing at entry 0 gets nothing."""
    from steering.hooks import SteeringHooks, StepHooks

    hooks = SteeringHooks(lm.blocks)
    try:
        ids = torch.tensor([lm.tokenizer("Hello there").input_ids] * 2)
        seen = {}
        probe = lm.blocks[4].register_forward_hook(lambda m, a, o: seen.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone()))
        with torch.inference_mode():
            lm.model(ids)
            base = seen["h"].clone()
            table = torch.zeros(2, lm.hidden_size)
            table[1, 0] = 5.0
            tokens = ids.shape[1]
            index = torch.tensor([0] * tokens + [1] * tokens)  # row 0's tokens, then row 1's
            with hooks.state(StepHooks(steer={5: (table, index)})):
                lm.model(ids)
        probe.remove()
        after = seen["h"]  # block 5 (index 4) produces layer 5; the probe runs after the steering hook
        assert torch.equal(after[0], base[0])
        assert torch.allclose(after[1] - base[1], table[1].expand_as(base[1]), atol=1e-4)
    finally:
        hooks.remove()
