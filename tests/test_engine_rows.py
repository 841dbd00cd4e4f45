"""Rows join, share a prefill and fail alone: the engine's admission (``max_waiting``, a row whose
deltas cannot be stored), prefill groups (the n choices of one request), and a fault while
scoring one row's prompt. The engine is stepped by the test, so every join happens at an exact
step."""

from __future__ import annotations

import pytest
import torch

from steering.engine import Done, Engine, EngineError, GenerationRequest, PrefillDone, QueueFullError
from steering.sampling import SamplingParams
from steering.steer import RowSteering
from tests.test_engine import _finished, _greedy, _prompt, _tokens


@pytest.fixture()
def engine(lm):
    eng = Engine(lm, max_batch_size=4, max_waiting=8, max_num_batched_tokens=48, max_model_len=1024)
    yield eng
    eng.hooks.remove()


def test_a_row_whose_steering_cannot_be_stored_fails_alone_and_its_slot_is_reused(lm):
    """A failure while a row joins (its deltas cannot be written) fails that row, returns its slot
    and leaves the delta table as it was: more such failures than there are slots still leave
    room for the next request."""
    engine = Engine(lm, max_batch_size=2, max_waiting=8, max_num_batched_tokens=64, max_model_len=256)
    ids = _prompt(lm, "Say hello.")
    # Layer 6 cannot get a table entry (as when growing a table fails), after layer 4 got one.
    poison = RowSteering(prompt={4: torch.ones(lm.hidden_size)}, response={6: torch.ones(lm.hidden_size)})
    original = engine.deltas._take

    def take(layer):
        if layer == 6:
            raise RuntimeError("injected allocation failure")
        return original(layer)

    engine.deltas._take = take
    try:
        failed = [engine.add_request(_greedy(ids, 2, steering=poison)) for _ in range(3)]
        steered = engine.add_request(_greedy(ids, 3, steering=RowSteering(prompt={5: torch.ones(lm.hidden_size)})))
        plain = engine.add_request(_greedy(ids, 3))
        for _ in range(40):
            if all(_finished(e) for e in failed + [steered, plain]):
                break
            engine.step()
        assert all(isinstance(e[-1], EngineError) and "injected" in str(e[-1]) for e in failed)
        assert isinstance(steered[-1], Done) and len(_tokens(steered)) == 3
        assert isinstance(plain[-1], Done) and len(_tokens(plain)) == 3
        engine.step()
        assert sorted(engine._free_slots) == [0, 1] and engine.running == 0
        assert engine.deltas.layers() == []  # the failed rows' layer-4 entries went back too
    finally:
        engine.hooks.remove()


class _UnwritableScores(list):
    def extend(self, values):
        raise RuntimeError("injected scoring fault")


def test_a_failure_while_scoring_one_rows_prompt_fails_that_row_only(lm, engine):
    """Prompt scoring runs after the forward pass, outside the retried part: a fault there fails
    its row, while the rows beside it (scored or sampling) finish and the engine keeps stepping."""
    ids = _prompt(lm, "The quick brown fox jumps over the lazy dog near the river bank.")

    def scored_request():
        return GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=0), score_from=1)

    healthy = engine.add_request(scored_request())
    broken = engine.add_request(scored_request())
    engine._pending[-1].scored = _UnwritableScores()
    beside = engine.add_request(_greedy(ids, 3))
    for _ in range(40):
        if all(_finished(e) for e in (healthy, broken, beside)):
            break
        engine.step()
    assert isinstance(broken[-1], EngineError) and "injected scoring fault" in str(broken[-1])
    assert len(next(e for e in healthy if isinstance(e, PrefillDone)).prompt_logprobs) == len(ids) - 1
    assert isinstance(beside[-1], Done) and len(_tokens(beside)) == 3
    again = engine.add_request(scored_request())
    while not _finished(again):
        engine.step()
    assert next(e for e in again if isinstance(e, PrefillDone)).prompt_logprobs == \
        next(e for e in healthy if isinstance(e, PrefillDone)).prompt_logprobs


def test_max_waiting_zero_admits_up_to_the_free_slots_and_queues_nothing(lm):
    """PERSONA_MAX_WAITING=0 means what it means to the vLLM engine: no request waits, so a
    request is refused only when every slot is taken (running + waiting >= max_batch_size +
    max_waiting), never by an idle server."""
    engine = Engine(lm, max_batch_size=2, max_waiting=0, max_num_batched_tokens=64, max_model_len=256)
    ids = _prompt(lm, "Say hello.")
    try:
        first = engine.add_request(_greedy(ids, 3))
        second = engine.add_request(_greedy(ids, 3))
        with pytest.raises(QueueFullError):
            engine.add_request(_greedy(ids, 3))
        engine.step()
        with pytest.raises(QueueFullError):  # both slots run; nothing may wait
            engine.add_request(_greedy(ids, 3))
        while not (_finished(first) and _finished(second)):
            engine.step()
        engine.step()
        assert _tokens(first) == _tokens(second) and len(_tokens(first)) == 3
        third = engine.add_request(_greedy(ids, 3))
        while not _finished(third):
            engine.step()
        assert _tokens(third) == _tokens(first)
    finally:
        engine.hooks.remove()


def test_a_prefill_group_reads_its_prompt_once_and_each_row_gets_its_solo_tokens(lm, engine):
    """The n choices of one request (one prefill group) read their shared prompt once: the others
    copy that cache and read only their last token, in one step, with their own probes."""
    ids = _prompt(lm, "Tell me about rivers, lakes and the sea, and why the sea is salty. " * 2)
    assert len(ids) > engine.max_num_batched_tokens  # the prompt takes several chunks
    probes = {10: torch.nn.functional.normalize(torch.ones(1, lm.hidden_size), dim=-1)}
    solo_events = engine.add_request(_greedy(ids, 6, probes=probes))
    while not _finished(solo_events):
        engine.step()
    chunks: list[list[tuple[int, int]]] = []
    original = engine._forward

    def recording(step):
        chunks.append([(a, b) for _row, a, b in step.chunks])
        return original(step)

    engine._forward = recording
    group = [engine.add_request(_greedy(ids, 6, probes=probes, prefill_group="g")) for _ in range(3)]
    while not all(_finished(e) for e in group):
        engine.step()
    del engine._forward
    assert sum(b - a for step in chunks for a, b in step) == len(ids) + 2
    assert [(len(ids) - 1, len(ids))] * 2 in chunks  # both copies read their last token in one step
    solo_projection = next(e for e in solo_events if isinstance(e, PrefillDone)).projections[10]
    for events in group:
        assert _tokens(events) == _tokens(solo_events)
        assert next(e for e in events if isinstance(e, PrefillDone)).projections[10] == pytest.approx(solo_projection, abs=1e-4)
