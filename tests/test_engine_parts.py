"""The engine's parts, each called on its own: scheduling (:class:`Scheduler`), the step's layout
(:func:`lay_out`), the forward (``Engine._run_model``) and the per-row outcome
(``Engine._outcome``); and, on a real server, what a request's lifetime releases when its client
leaves mid-stream (:class:`app.generation.RequestLifetime`)."""

from __future__ import annotations

import time

import httpx
import pytest
import torch

from steering import kvcache
from steering.engine import (Done, Engine, EngineError, GenerationRequest, PrefillDone, QueueFullError, Scheduler,
                             TokenOut, _Handle, _Row, _Step, lay_out)
from steering.sampling import SamplingParams
from steering.steer import DeltaTable, RowSteering

CPU = torch.device("cpu")


def _row(uid: int, prompt: list[int], *, computed: int = 0, output: tuple[int, ...] = (), slot: int = -1,
         max_new: int = 4, deadline: float | None = None, **request) -> _Row:
    return _Row(request=GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(max_new_tokens=max_new), **request),
                handle=_Handle(loop=None, events=[]), uid=uid, generator=None, submitted=time.monotonic(),
                deadline=deadline, slot=slot, computed=computed, output=list(output))


def _scheduler(slots: int, waiting: int = 8, budget: int = 16) -> Scheduler:
    return Scheduler(max_batch_size=slots, max_waiting=waiting, max_num_batched_tokens=budget, attention_horizon=1536.0)


# ---- scheduling ------------------------------------------------------------------------------

def test_the_scheduler_admits_in_arrival_order_into_the_lowest_free_slots_and_queues_the_rest():
    scheduler = _scheduler(slots=3)
    rows = [_row(i, [1, 2, 3]) for i in range(4)]
    for row in rows:
        scheduler.queue(row)
    scheduler.admit(lambda row: True)
    assert [(r.uid, r.slot) for r in scheduler.rows] == [(0, 0), (1, 1), (2, 2)]
    assert list(scheduler.pending) == [rows[3]] and scheduler.free_slots == []


def test_a_row_that_cannot_join_takes_no_slot():
    scheduler = _scheduler(slots=1)
    refused, admitted = _row(0, [1, 2]), _row(1, [1, 2])
    scheduler.queue(refused)
    scheduler.queue(admitted)
    scheduler.admit(lambda row: row is not refused)
    assert scheduler.rows == [admitted] and admitted.slot == 0 and refused.slot == -1


def test_the_queue_holds_max_waiting_rows_beyond_the_free_slots():
    scheduler = _scheduler(slots=2, waiting=1)
    for i in range(3):
        scheduler.queue(_row(i, [1]))
    with pytest.raises(QueueFullError):
        scheduler.queue(_row(3, [1]))
    scheduler.admit(lambda row: True)
    with pytest.raises(QueueFullError):  # two running, one waiting: full until one leaves
        scheduler.queue(_row(4, [1]))
    scheduler.leave(scheduler.pending[0])
    scheduler.queue(_row(5, [1]))


def test_a_step_takes_every_decoding_row_then_prompt_chunks_in_arrival_order_within_the_budget():
    scheduler = _scheduler(slots=4, budget=16)
    decoding = _row(0, [1, 2, 3], computed=3, output=(7,))
    first, second, third = _row(1, list(range(10))), _row(2, list(range(10))), _row(3, list(range(4)))
    for row in (first, decoding, second, third):
        scheduler.queue(row)
    scheduler.admit(lambda row: True)
    step = scheduler.plan()
    assert step.decode == [decoding]
    # 15 tokens beside the decoding row: all of the first prompt, the first 5 of the second, none of the third.
    assert step.chunks == [(first, 0, 10), (second, 0, 5)]


def test_one_row_of_a_prefill_group_reads_the_shared_prompt():
    scheduler = _scheduler(slots=3, budget=64)
    group = [_row(i, list(range(8)), prefill_group="g") for i in range(3)]
    for row in group:
        scheduler.queue(row)
    scheduler.admit(lambda row: True)
    assert scheduler.plan().chunks == [(group[0], 0, 8)]


def test_cancelled_rows_end_late_rows_are_handed_back_and_release_frees_lowest_slots_first():
    scheduler = _scheduler(slots=3)
    now = time.monotonic()
    cancelled, late, running = _row(0, [1]), _row(1, [1], deadline=now - 1), _row(2, [1], deadline=now + 60)
    for row in (cancelled, late, running):
        scheduler.queue(row)
    scheduler.admit(lambda row: True)
    cancelled.handle.cancelled = True
    assert scheduler.overdue(now) == [late] and cancelled.done and not late.done
    late.done = True  # what the engine's failure does
    freed = []
    scheduler.release(freed.append)
    assert freed == [cancelled, late] and scheduler.rows == [running]
    assert scheduler.free_slots == [1, 0]  # popped from the end: slot 0 is taken next


def test_queued_rows_past_their_deadline_leave_the_queue_and_are_handed_back():
    scheduler = _scheduler(slots=1)
    now = time.monotonic()
    gone, late, waiting = _row(0, [1]), _row(1, [1], deadline=now - 1), _row(2, [1])
    for row in (gone, late, waiting):
        scheduler.queue(row)
    gone.handle.cancelled = True
    assert scheduler.expire_queued(now) == [late] and list(scheduler.pending) == [waiting]


# ---- the step's layout -----------------------------------------------------------------------

def _table() -> tuple[kvcache.SlotKVCache, DeltaTable]:
    cache = kvcache.SlotKVCache(num_layers=2, slots=4, kv_heads=1, head_dim=4, max_len=32, dtype=torch.float32,
                                device_of_layer=lambda layer: CPU)
    return cache, DeltaTable(hidden_size=4, dtype=torch.float32, device_of_layer=lambda layer: CPU)


def _mixed_step(deltas: DeltaTable, adapter: object) -> tuple[_Step, list[_Row]]:
    """Two decoding rows (slots 2 and 0), the last chunk of a scored, probed, steered prompt
    (slot 1), and the first chunk of an adapter's prompt (slot 3)."""
    push = torch.ones(4)
    steered = _row(0, [11, 12, 13], computed=3, output=(21, 22), slot=2,
                   steering=RowSteering(prompt={}, response={1: push}))
    watched = _row(1, [31, 32], computed=2, output=(41,), slot=0, response_probes={2: torch.ones(1, 4)})
    scored = _row(2, [51, 52, 53, 54, 55, 56], computed=2, slot=1, score_from=1, probes={1: torch.ones(1, 4)},
                  steering=RowSteering(prompt={1: 2 * push}, response={}))
    adapted = _row(3, list(range(61, 71)), slot=3, adapter=adapter)
    for row in (steered, watched, scored, adapted):
        row.steer_ids = deltas.add(row.request.steering)
    return _Step(decode=[steered, watched], chunks=[(scored, 2, 6), (adapted, 0, 3)]), [steered, watched, scored, adapted]


def test_the_layout_of_a_mixed_prefill_and_decode_step():
    cache, deltas = _table()
    adapter = object()  # the layout groups adapters by identity only
    step, (steered, watched, scored, adapted) = _mixed_step(deltas, adapter)
    packed = lay_out(step, cache, deltas, CPU)
    # Decoding rows' newest tokens first, then the chunks; positions within each row, slots per token.
    assert packed.ids == [22, 41, 53, 54, 55, 56, 61, 62, 63]
    assert packed.positions == [4, 2, 2, 3, 4, 5, 0, 1, 2]
    assert packed.attention.slots.tolist() == [2, 0, 1, 1, 1, 1, 3, 3, 3]
    assert packed.attention.chunks == [kvcache.Chunk(2, 6, 1, 2), kvcache.Chunk(6, 9, 3, 0)]
    # The decoding rows attend over slots 0..2: slot 0 to its 3 positions, slot 2 to its 5.
    assert packed.attention.decode_span == 3 and not packed.attention.decode_dense
    assert packed.attention.decode_mask[:, 0, 0, :].sum(-1).tolist() == [3, 1, 5]
    # One logit per sampling row (the scored prompt was read to its end), then the scored positions.
    assert packed.last == {steered: 0, watched: 1, scored: 5}
    assert packed.logit_rows == [steered, watched, scored]
    assert packed.keep == [0, 1, 5, 2, 3, 4]
    assert packed.scoring == [(scored, 3, [54, 55, 56])]
    # Captures: the decoding row's response probe, the finished prompt's last token.
    assert {layer: t.tolist() for layer, t in packed.hooks.capture.items()} == {2: [1], 1: [5]}
    assert packed.captured_at == {2: {1: 0}, 1: {5: 0}}
    # Layer 1's steering: response deltas for the steered decoding row, prompt deltas for the chunk.
    table, index = packed.hooks.steer[1]
    response, prompt = steered.steer_ids[(1, "response")], scored.steer_ids[(1, "prompt")]
    assert index.tolist() == [response, 0] + [prompt] * 4 + [0] * 3
    assert torch.equal(table[prompt], 2 * torch.ones(4)) and torch.equal(table[response], torch.ones(4))
    assert [(a, rows.tolist()) for a, rows in packed.lora.groups] == [(adapter, [6, 7, 8])]


def test_the_layout_builds_no_decode_masks_for_the_cpu_kernels(lm):
    if lm.kernels is None:
        pytest.skip("steering.cpu_kernels did not build here")
    cache, deltas = _table()
    step, _rows = _mixed_step(deltas, object())
    attention = lay_out(step, cache, deltas, CPU, kernels=lm.kernels).attention
    assert attention.decode_mask is None and attention.decode_slots is None
    ready = attention.on(CPU, torch.float32)
    assert ready.decode_bias is None and ready.chunk_bias == [] and ready.flat.numel() == 9


# ---- the forward and the per-row outcome -----------------------------------------------------

@pytest.fixture()
def engine(lm):
    eng = Engine(lm, max_batch_size=3, max_waiting=4, max_num_batched_tokens=64, max_model_len=256)
    yield eng
    eng.hooks.remove()


def _prompt(lm, text: str) -> list[int]:
    return lm.tokenizer(text)["input_ids"]


def _prefill_step(engine: Engine, *requests: GenerationRequest) -> tuple[_Step, list[list]]:
    events = [engine.add_request(r) for r in requests]
    engine._admit()
    step = engine._schedule()
    assert [b for _row, _a, b in step.chunks] == [len(r.prompt_ids) for r in requests]  # whole prompts
    return step, events


def test_the_forward_returns_the_kept_logits_of_each_packed_prompt(lm, engine):
    prompts = [_prompt(lm, "Rivers run to the sea"), _prompt(lm, "The capital of France is")]
    step, _events = _prefill_step(engine, *(GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_new_tokens=1))
                                            for p in prompts))
    packed = lay_out(step, engine.cache, engine.deltas, CPU, engine.kernels)
    passes = engine.forward_passes
    logits = engine._run_model(packed)
    assert engine.forward_passes == passes + 1 and logits.shape == (2, lm.model.config.vocab_size)
    for prompt, row_logits in zip(prompts, logits):
        alone = lm.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert torch.allclose(row_logits.float(), alone.float(), atol=1e-2)
        assert int(row_logits.argmax()) == int(alone.argmax())


def test_a_fault_in_one_rows_outcome_fails_that_row_only(lm, engine):
    ids = _prompt(lm, "Tell me about the sea")
    wrong = torch.ones(1, lm.hidden_size + 1)  # a probe of the wrong width breaks its row's prefill report
    healthy = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=2, temperature=0))
    broken = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=2, temperature=0),
                               probes={5: wrong})
    step, (good, bad) = _prefill_step(engine, healthy, broken)
    logits, packed = engine._forward(step)
    engine._outcome(step, packed, logits)
    engine._flush()
    assert [type(e) for e in good] == [PrefillDone, TokenOut]
    assert len(bad) == 1 and isinstance(bad[0], EngineError)
    bad_row = step.chunks[1][0]
    engine._release_finished()
    assert engine.running == 1 and bad_row.slot in engine._free_slots
    while not any(isinstance(e, Done) for e in good):
        engine.step()
    assert len([e for e in good if isinstance(e, TokenOut)]) == 2


# ---- a request's lifetime on the server ------------------------------------------------------

def test_a_client_leaving_mid_stream_releases_every_choice_its_slots_and_its_steering(server):
    engine = server.state.engine
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell a long story."}], "n": 2,
            "max_tokens": 2000, "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": 1,
            "steering": [{"vector": "optimistic", "coefficient": 1.0, "layers": [12]}]}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [next(lines) for _ in range(8)]
            assert any(line.startswith("data: {") for line in got)
            assert engine.running == 2 and 12 in engine.deltas.layers()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (engine.running or engine.waiting):
        time.sleep(0.05)
    assert engine.running == 0 and engine.waiting == 0
    assert sorted(engine._free_slots) == list(range(engine.max_batch_size))
    assert engine.deltas.layers() == []
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "persona_requests_running 0.0" in metrics
