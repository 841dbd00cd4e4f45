"""The engine on its own, stepped by the test (no worker thread), so joins, leaves and chunked
prefill happen at exact steps; and the worker's failure handling."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from steering import cpu_kernels, kvcache
from steering import engine as engine_module
from steering.chat import chat_prompt_ids
from steering.cpu_linear import PackedLinear, packing_available
from steering.engine import (
    DeadlineExceededError,
    Done,
    Engine,
    EngineError,
    GenerationRequest,
    PrefillDone,
    QueueFullError,
    RequestTooLongError,
    TokenOut,
)
from steering.model import load_model
from steering.sampling import SamplingParams
from steering.steer import RowSteering
from tests.conftest import CACHE_DIR


def _prompt(lm, text: str) -> list[int]:
    return chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": text}])


def _greedy(ids: list[int], max_new: int, **request) -> GenerationRequest:
    return GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=max_new, temperature=0,
                                                                     ignore_eos=True), **request)


def _tokens(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenOut)]


def _finished(events: list) -> bool:
    return any(isinstance(e, (Done, Exception)) for e in events)


@pytest.fixture()
def engine(lm):
    eng = Engine(lm, max_batch_size=4, max_waiting=8, max_num_batched_tokens=48, max_model_len=1024)
    yield eng
    eng.hooks.remove()


def _solo(engine: Engine, request: GenerationRequest) -> list[int]:
    events = engine.add_request(request)
    while not _finished(events):
        engine.step()
    return _tokens(events)


def test_rows_joining_mid_decode_and_leaving_early_get_their_solo_tokens(lm, engine):
    _joins_and_leaves_match_solo(lm, engine)


def _joins_and_leaves_match_solo(lm, engine):
    short = _prompt(lm, "Name a colour.")
    long = _prompt(lm, "Tell me about rivers, lakes and the sea. " * 12)  # several chunks of the 48-token budget
    medium = _prompt(lm, "Write one sentence about a cat that likes to sleep in the sun.")
    assert len(long) > 3 * 48
    solo = {key: _solo(engine, _greedy(list(key), n)) for key, n in ((tuple(short), 30), (tuple(long), 8),
                                                                      (tuple(medium), 4))}

    first = engine.add_request(_greedy(short, 30))
    joined = {}
    steps = 0
    while not _finished(first):
        if steps == 3:
            joined["long"] = engine.add_request(_greedy(long, 8))
        if steps == 5:
            joined["medium"] = engine.add_request(_greedy(medium, 4))
        before = len(_tokens(first))
        engine.step()
        steps += 1
        if steps > 1:  # decoding rows get a token every step, whatever is being prefilled beside them
            assert len(_tokens(first)) == before + 1
    while not all(_finished(e) for e in joined.values()):
        engine.step()
    assert _tokens(first) == solo[tuple(short)]
    assert _tokens(joined["long"]) == solo[tuple(long)]
    assert _tokens(joined["medium"]) == solo[tuple(medium)]
    assert engine.running == 0 and sorted(engine._free_slots) == list(range(engine.max_batch_size))


@pytest.mark.skipif(not packing_available(torch.float32), reason="this torch build has no oneDNN linear layers")
def test_prepacked_float32_layers_match_plain_ones(lm):
    """Without our kernels (``PERSONA_CPU_KERNELS=0``) float32 layers pack their weights for oneDNN
    (at every step size) and give the plain layers' logits up to the order of accumulation;
    packing happens on first use."""
    plain = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    fresh = load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, cpu_kernels=False)
    linears = [m for m in plain.model.modules() if isinstance(m, torch.nn.Linear)]
    packed_linears = [m for m in fresh.model.modules() if isinstance(m, PackedLinear)]
    assert not any(isinstance(m, PackedLinear) for m in linears)
    assert len(packed_linears) == len(linears) > 0 and all(m.packed is None and m.kernel is None for m in packed_linears)
    prompt = _prompt(plain, "Describe a quiet morning by the sea.")
    with torch.inference_mode():
        for ids in (torch.tensor([(prompt * 20)[:300]]), torch.tensor([prompt[-1:]])):
            a = plain.model(input_ids=ids).logits
            b = fresh.model(input_ids=ids).logits
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert all(m.packed is not None and m.packed.layout == torch._mkldnn for m in packed_linears)


@pytest.mark.skipif(not cpu_kernels.supported(), reason="no AVX2 or no C++ compiler here")
def test_the_kernels_give_each_row_the_same_bits_whatever_shares_its_call():
    """steering.cpu_kernels against float64 references, on every shape edge (output rows not a
    multiple of the 3-row tiles, inputs not of the 8-wide steps, input rows not of the 4-row
    tiles, bias), in float32 and bfloat16; and each row's result bit for bit the same computed
    alone, in any slice of the batch, or among 70 rows (so at any batch size)."""
    kernel = cpu_kernels.load()
    assert kernel is not None  # supported here, so it must have been built
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for rows, inputs in [(1, 8), (3, 20), (5, 576), (7, 17), (6, 3), (960, 576), (49, 1536)]:
            weight = torch.randn(rows, inputs, generator=generator).to(dtype)
            x = torch.randn(70, inputs, generator=generator).to(dtype)
            for bias in (torch.empty(0, dtype=dtype), torch.randn(rows, generator=generator).to(dtype)):
                got = kernel.linear(x, weight, bias)
                want = torch.nn.functional.linear(x.double(), weight.double(), bias.double() if bias.numel() else None)
                assert got.shape == (70, rows) and got.dtype == dtype
                assert torch.allclose(got.double(), want, rtol=tolerance, atol=tolerance * inputs ** 0.5), (rows, inputs)
                for start, count in ((0, 1), (5, 1), (3, 2), (9, 5), (17, 33)):
                    assert torch.equal(kernel.linear(x[start:start + count], weight, bias), got[start:start + count])
        x = torch.randn(37, 576, generator=generator).to(dtype)
        weight = torch.randn(576, generator=generator).to(dtype)
        normed = kernel.rms_norm(x, weight, 1e-5)
        h = x.double()
        want = weight.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert torch.allclose(normed.double(), want, rtol=tolerance, atol=tolerance)
        assert torch.equal(kernel.rms_norm(x[4:5], weight, 1e-5), normed[4:5])
        gate_up = torch.randn(37, 64, generator=generator).to(dtype)
        act = kernel.silu_mul(gate_up)
        want = torch.nn.functional.silu(gate_up[:, :32].double()) * gate_up[:, 32:].double()
        assert torch.allclose(act.double(), want, rtol=tolerance, atol=tolerance)
        assert torch.equal(kernel.silu_mul(gate_up[6:7]), act[6:7])


@pytest.mark.skipif(not cpu_kernels.supported(), reason="no AVX2 or no C++ compiler here")
def test_the_kernels_attention_and_exp_match_float64_for_every_head_size_and_thread_count():
    """The attention kernel's fixed-size paths (head size 64 with groups 1-4, 128 with 1, 2 and 4)
    and its generic path (32) against float64 softmax attention, with a window and a score cap;
    each token's bits the same alone, among 300 tokens, and with 1 or 2 threads (threads take
    tasks in strides). And the vectorised e^x in SiLU across the float32 range, ±100 included."""
    kernel = cpu_kernels.load()
    assert kernel is not None
    generator = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    for dim, heads, kv_heads in ((64, 9, 3), (64, 4, 4), (128, 8, 4), (128, 8, 2), (32, 4, 2)):
        group = heads // kv_heads
        keys = torch.randn(2, kv_heads, 320, dim, generator=generator)
        values = torch.randn(2, kv_heads, 320, dim, generator=generator)
        query = torch.randn(300, heads, dim, generator=generator)
        slots = torch.randint(0, 2, (300,), generator=generator)
        positions = torch.randint(0, 320, (300,), generator=generator)
        for window, cap in ((0, 0.0), (40, 0.0), (0, 20.0)):
            got = kernel.attention(query, keys, values, slots, positions, 0.3, window, cap)
            for t in (0, 7, 151, 299):
                first = max(0, int(positions[t]) - window + 1) if window else 0
                k = keys[slots[t], :, first:positions[t] + 1].double()
                v = values[slots[t], :, first:positions[t] + 1].double()
                for h in range(heads):
                    scores = k[h // group] @ query[t, h].double() * 0.3
                    if cap:
                        scores = cap * torch.tanh(scores / cap)
                    want = torch.softmax(scores, dim=-1) @ v[h // group]
                    assert torch.allclose(got[t, h].double(), want, atol=1e-5), (dim, group, window, cap, t, h)
                alone = kernel.attention(query[t:t + 1], keys, values, slots[t:t + 1], positions[t:t + 1], 0.3, window, cap)
                assert torch.equal(alone, got[t:t + 1])
            try:
                torch.set_num_threads(1)
                assert torch.equal(kernel.attention(query, keys, values, slots, positions, 0.3, window, cap), got)
            finally:
                torch.set_num_threads(threads)
        bf = kernel.attention(query.bfloat16(), keys.bfloat16(), values.bfloat16(), slots, positions, 0.3, 0, 0.0)
        assert torch.equal(kernel.attention(query[5:6].bfloat16(), keys.bfloat16(), values.bfloat16(), slots[5:6],
                                            positions[5:6], 0.3, 0, 0.0), bf[5:6])
    gate = torch.cat([torch.linspace(-100, 100, 4001), torch.linspace(-3, 3, 999)])
    act = kernel.silu_mul(torch.cat([gate, torch.ones_like(gate)])[None])[0]
    want = torch.nn.functional.silu(gate.double())
    assert torch.allclose(act.double(), want, rtol=3e-7, atol=1e-30)


@pytest.mark.skipif(not cpu_kernels.supported(), reason="no AVX2 or no C++ compiler here")
def test_every_step_size_takes_the_kernel_on_every_linear_layer(lm):
    """Every linear layer of the shared model (and the fused decoder's concatenated ones) multiplies
    with steering.cpu_kernels whatever the number of rows, and the engine's norms and attention
    use it too; no oneDNN copy of a weight is made."""
    packed = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kernel is not None for m in packed) and lm.kernels is not None
    engine = Engine(lm, max_batch_size=2, max_num_batched_tokens=16, max_model_len=64)
    try:
        assert engine.fused.kernels is lm.kernels
        assert all(layer.qkv.kernel is not None and layer.gate_up.kernel is not None for layer in engine.fused.layers)
    finally:
        engine.hooks.remove()
    layer = packed[0]
    calls = []

    class Spy:
        def linear(self, *args):
            calls.append(args[0].shape)
            return layer_kernel.linear(*args)

    layer_kernel = layer.kernel
    x = torch.randn(100, 1, layer.in_features)
    try:
        layer.kernel = Spy()
        with torch.inference_mode():
            one = layer(x[:1])
            many = layer(x)
    finally:
        layer.kernel = layer_kernel
    assert calls == [(1, layer.in_features), (100, layer.in_features)]
    assert one.shape == (1, 1, layer.out_features)
    assert torch.equal(one[0], many[0])
    assert all(m.packed is None for m in packed)


def test_the_kernels_can_be_turned_off():
    """``PERSONA_CPU_KERNELS=0`` reaches the model's layers: packed for oneDNN, no kernel."""
    code = ("from app.settings import Settings; from steering.cpu_linear import prepack_linears; import torch; "
            "m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)); "
            "s = Settings(); print(s.cpu_kernels, prepack_linears(m, kernels=s.cpu_kernels), "
            "[l.kernel is None for l in m])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PERSONA_CPU_KERNELS": "0"})
    assert out.stdout.split("\n")[-2] == "False 2 [True, True]", out.stdout


def test_blocks_offloaded_by_a_device_map_keep_their_cache_and_deltas_where_they_compute(lm, tmp_path):
    """accelerate's device maps can offload blocks ("cpu" or "disk"): their weights sit on ``meta``
    between forwards and come in for each. The engine must put such a block's KV cache, steering
    deltas and captures on the device it computes on (not ``meta``), and generate what the same
    model kept whole generates, steered at the offloaded block and monitored after it."""
    import copy

    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from steering.layers import decoder_blocks
    from steering.model import LoadedModel

    config = LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    whole = LlamaForCausalLM(config).eval().requires_grad_(False)
    split = copy.deepcopy(whole)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    split = dispatch_model(split, device_map=device_map, offload_dir=str(tmp_path / "offload"))
    assert next(split.model.layers[1].parameters()).device.type == "meta"
    assert split.lm_head.weight.device.type == "meta"

    def loaded(model):
        return LoadedModel(model=model, tokenizer=lm.tokenizer, name="tiny", fingerprint="tiny", num_layers=3,
                           hidden_size=64, context_length=256, dtype=torch.float32, blocks=decoder_blocks(model),
                           eos_token_ids=lm.eos_token_ids)

    offloaded = loaded(split)
    assert offloaded.block_device(2) == offloaded.output_device == torch.device("cpu")
    push = torch.randn(64, generator=torch.Generator().manual_seed(1))
    probe = torch.nn.functional.normalize(torch.randn(1, 64, generator=torch.Generator().manual_seed(2)), dim=-1)
    prompt = _prompt(lm, "Say something about rivers.")
    results = []
    for model in (loaded(whole), offloaded):
        engine = Engine(model, max_batch_size=2, max_num_batched_tokens=16, max_model_len=128, fused=False)
        try:
            assert all(t.device.type == "cpu" for t in engine.cache.keys + engine.cache.values)
            plain = engine.add_request(_greedy(prompt, 8))
            steered = engine.add_request(_greedy(prompt, 8, steering=RowSteering(prompt={2: push}, response={2: push}),
                                                 probes={3: probe}))
            seeded = engine.add_request(GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(
                max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True)))
            while not all(_finished(e) for e in (plain, steered, seeded)):
                engine.step()
            results.append([_tokens(e) for e in (plain, steered, seeded)])
        finally:
            engine.hooks.remove()
    assert all(len(tokens) == 8 for tokens in results[1]), results
    assert results[0] == results[1]
    assert results[0][0] != results[0][1]  # the steering at the offloaded block changed the text


@pytest.mark.skipif(not packing_available(), reason="this CPU or torch build has no oneDNN bfloat16")
def test_prepacked_bfloat16_layers_match_plain_ones_and_our_kernels_keep_batch_invariance():
    """Without our kernels bfloat16 layers pack for oneDNN up to 64 rows and stay close to the plain
    ones; with them (the default), a row's greedy tokens are the same alone and beside others,
    across steps of more and fewer than 64 tokens, joins, leaves and chunked prefills."""
    plain = load_model("default", dtype="bfloat16", device="cpu", cache_dir=CACHE_DIR, prepack=False, cpu_kernels=False)
    packed = load_model("default", dtype="bfloat16", device="cpu", cache_dir=CACHE_DIR, cpu_kernels=False)
    linears = [m for m in plain.model.modules() if isinstance(m, torch.nn.Linear)]
    packed_linears = [m for m in packed.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed_linears) == len(linears) > 0
    prompt = _prompt(plain, "Describe a quiet morning by the sea.")
    rows = packed_linears[0].packed_max_rows
    with torch.inference_mode():  # more rows than that take the plain weights, 11 the packed ones
        for ids in (torch.tensor([(prompt * 8)[:rows + 16]]), torch.tensor([prompt[-11:]])):
            a = plain.model(input_ids=ids).logits.float()
            b = packed.model(input_ids=ids).logits.float()
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            assert (a - b).abs().max() <= 0.02 * a.abs().max()
            if ids.shape[1] > rows:
                assert all(m.packed is None for m in packed_linears)  # packed on first use only
    assert all(m.packed.layout == torch._mkldnn for m in packed_linears)
    del plain, packed
    exact = load_model("default", dtype="bfloat16", device="cpu", cache_dir=CACHE_DIR)
    engine = Engine(exact, max_batch_size=32, max_waiting=64, max_num_batched_tokens=48, max_model_len=512)
    try:
        _joins_and_leaves_match_solo(exact, engine)
    finally:
        engine.hooks.remove()
    engine = Engine(exact, max_batch_size=32, max_waiting=64, max_num_batched_tokens=2 * rows, max_model_len=512)
    try:
        # One row alone and amid 31 others: its first tokens come out of steps that also read the
        # others' prompts (more than `rows` tokens), the rest out of 32-row decode steps.
        others = [_prompt(exact, f"Write a line about the number {i}.") for i in range(31)]
        alone = _solo(engine, _greedy(prompt, 24))
        target = engine.add_request(_greedy(prompt, 24))
        rest = [engine.add_request(_greedy(p, 24)) for p in others]
        sizes = []
        original = engine._forward

        def spy(step):
            if not _finished(target):
                sizes.append(len(step.decode) + sum(b - a for _r, a, b in step.chunks))
            return original(step)

        engine._forward = spy
        while not all(_finished(e) for e in [target, *rest]):
            engine.step()
        assert _tokens(target) == alone
        assert max(sizes) > rows and min(sizes) <= rows, sizes
    finally:
        engine.hooks.remove()


def test_a_long_prompt_is_prefilled_in_chunks_within_the_step_budget(lm, engine):
    decoding = engine.add_request(_greedy(_prompt(lm, "Count slowly."), 40))
    engine.step()  # prefill of the short prompt
    long = _prompt(lm, "Describe the history of bridges in great detail. " * 15)
    arriving = engine.add_request(_greedy(long, 2))
    sizes = []
    original = engine._forward

    def spy(step):
        sizes.append(len(step.decode) + sum(b - a for _r, a, b in step.chunks))
        return original(step)

    engine._forward = spy
    while not any(isinstance(e, PrefillDone) for e in arriving):
        engine.step()
    assert max(sizes) <= engine.max_num_batched_tokens
    assert len(sizes) >= len(long) // (engine.max_num_batched_tokens - 1)
    # The decoding row advanced one token in every one of those steps.
    assert len(_tokens(decoding)) == len(sizes) + 1


def test_small_steps_leave_a_core_to_the_event_loop_and_large_ones_use_every_thread(lm):
    torch.set_num_threads(2)
    engine = Engine(lm, max_batch_size=4, max_num_batched_tokens=64, max_model_len=512, small_step_threads=1)
    try:
        assert (engine.threads, engine.small_step_threads) == (2, 1)
        seen = []
        original = engine._forward

        def spy(step):
            seen.append((len(step.decode) + sum(b - a for _r, a, b in step.chunks), torch.get_num_threads()))
            return original(step)

        engine._forward = spy
        events = engine.add_request(_greedy(_prompt(lm, "Tell me about rivers and the sea, at some length."), 3))
        while not _finished(events):
            engine.step()
            assert torch.get_num_threads() == 2  # the caller's own setting comes back after each step
        assert seen[0][0] > engine.small_step_tokens and seen[0][1] == 2  # the prompt: every thread
        assert [threads for _tokens, threads in seen[1:]] == [1, 1]  # one-token decode steps: one fewer
    finally:
        engine.hooks.remove()


def test_chunks_deep_into_a_long_prompt_are_smaller_so_every_step_costs_about_the_same(lm):
    engine = Engine(lm, max_batch_size=4, max_num_batched_tokens=64, max_model_len=1024, attention_horizon=200)
    try:
        decoding = engine.add_request(_greedy(_prompt(lm, "Count slowly."), 60))
        engine.step()
        long = _prompt(lm, "Describe the history of bridges in great detail. " * 30)
        arriving = engine.add_request(_greedy(long, 2))
        chunks = []
        original = engine._forward

        def spy(step):
            chunks.extend((a, b - a) for _row, a, b in step.chunks)
            return original(step)

        engine._forward = spy
        while not any(isinstance(e, PrefillDone) for e in arriving):
            engine.step()
        assert sum(n for _past, n in chunks) == len(long)
        allowance = engine._chunk_cost(0, 64) - 1  # one decoding row beside the chunk
        for past, n in chunks[:-1]:
            assert engine._chunk_cost(past, n) <= allowance < engine._chunk_cost(past, n + 1)
        sizes = [n for _past, n in chunks[:-1]]
        assert sizes[0] == 63 and sizes == sorted(sizes, reverse=True)  # 63 fresh tokens, then fewer
        assert sizes[-1] <= 32  # about 300 tokens in, a chunk gets about half of a fresh one
    finally:
        engine.hooks.remove()


def test_a_prompt_that_cannot_fit_is_refused_at_submission(lm, engine):
    with pytest.raises(RequestTooLongError):
        engine.add_request(_greedy([1] * 1000, 100))


def test_one_rows_bad_probe_fails_that_row_only(lm, engine):
    ids = _prompt(lm, "Say hello.")
    good = engine.add_request(_greedy(ids, 5, probes={10: torch.ones(2, lm.hidden_size)}))
    bad = engine.add_request(_greedy(ids, 5, probes={10: torch.ones(2, lm.hidden_size + 1)}))
    while not (_finished(good) and _finished(bad)):
        engine.step()
    assert isinstance(bad[-1], EngineError)
    assert isinstance(good[-1], Done) and len(_tokens(good)) == 5
    assert len(next(e for e in good if isinstance(e, PrefillDone)).projections[10]) == 2


def test_tiny_temperature_is_greedy_and_does_not_fail_the_batch(lm, engine):
    ids = _prompt(lm, "What is the capital of France?")
    greedy = [engine.add_request(_greedy(ids, 8)) for _ in range(3)]
    tiny = engine.add_request(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(
        max_new_tokens=8, temperature=1e-38, ignore_eos=True)))
    while not all(_finished(e) for e in greedy + [tiny]):
        engine.step()
    assert all(isinstance(e[-1], Done) for e in greedy + [tiny])
    assert _tokens(tiny) == _tokens(greedy[0])


def test_queued_requests_expire_and_cancelled_ones_free_their_place(lm):
    engine = Engine(lm, max_batch_size=1, max_waiting=1, max_num_batched_tokens=64, max_model_len=512)
    engine.start()
    ids = _prompt(lm, "Tell me a long story.")

    async def scenario():
        running = asyncio.ensure_future(_drain(engine.generate(_greedy(ids, 120))))
        while engine.running < 1:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="queued"):
            await _drain(engine.generate(GenerationRequest(prompt_ids=ids, timeout_s=0.3,
                                                           sampling=SamplingParams(max_new_tokens=4))))
        assert time.monotonic() - started < 5
        assert engine.running == 1  # it never took a slot: no prefill was spent on it
        await _leave_while_queued(engine, _greedy(ids, 4))
        assert engine.waiting == 0  # the place it held is free again at once
        queued = engine.generate(_greedy(ids, 2))
        next_event = asyncio.ensure_future(anext(queued))
        await asyncio.sleep(0.05)
        assert engine.waiting == 1 and not next_event.done()  # queued, not refused with QueueFullError
        next_event.cancel()
        await asyncio.sleep(0)
        await queued.aclose()
        with pytest.raises(QueueFullError):  # the limit itself still holds
            second = engine.generate(_greedy(ids, 2))
            blocker = engine.generate(_greedy(ids, 2))
            first_wait = asyncio.ensure_future(anext(second))
            await asyncio.sleep(0.05)
            try:
                await anext(blocker)
            finally:
                first_wait.cancel()
                await asyncio.sleep(0)
                await second.aclose()
        await running

    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
        engine.hooks.remove()


async def _drain(stream) -> list:
    return [event async for event in stream]


async def _leave_while_queued(engine: Engine, request: GenerationRequest) -> None:
    """Submit ``request`` to a full engine and close its stream while it is still queued."""
    stream = engine.generate(request)
    waiter = asyncio.ensure_future(anext(stream))
    while engine.waiting < 1:
        await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0)
    await stream.aclose()


def test_a_dead_worker_fails_waiting_clients_at_once_and_is_not_alive(lm):
    engine = Engine(lm, max_batch_size=2, max_waiting=4, max_model_len=512)

    def boom():
        raise SystemError("bookkeeping broke")

    engine._release_finished = boom
    engine.start()

    async def scenario():
        with pytest.raises(EngineError, match="stopped"):
            await _drain(engine.generate(_greedy(_prompt(lm, "Hi"), 4)))
        with pytest.raises(EngineError, match="stopped"):
            await _drain(engine.generate(_greedy(_prompt(lm, "Hi"), 4)))

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        assert not engine.alive
    finally:
        engine.shutdown()
        engine.hooks.remove()


def test_prompt_logprobs_match_a_plain_forward_across_chunk_boundaries(lm, engine):
    """Teacher-forced scoring (what the coefficient sweep's perplexity reads) gives the same
    log-probabilities as one plain forward pass, also when the scored span straddles chunks and
    a decoding row shares the steps."""
    ids = _prompt(lm, "Tell me about rivers. " * 5) + lm.tokenizer(
        "Rivers carry the rain from the hills down to the sea.", add_special_tokens=False).input_ids
    start = 20
    # The span crosses a chunk boundary, wherever the short prompt beside it puts that boundary.
    assert len(ids) > engine.max_num_batched_tokens
    with torch.no_grad():
        plain = torch.log_softmax(lm.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [float(plain[i - 1, ids[i]]) for i in range(start, len(ids))]

    decoding = engine.add_request(_greedy(_prompt(lm, "Count slowly."), 12))
    scored = engine.add_request(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=0),
                                                  score_from=start))
    while not (_finished(scored) and _finished(decoding)):
        engine.step()
    got = next(e for e in scored if isinstance(e, PrefillDone)).prompt_logprobs
    assert len(got) == len(expected)
    assert got == pytest.approx(expected, abs=1e-3)
    assert len(_tokens(decoding)) == 12
    with pytest.raises(ValueError):
        engine.add_request(GenerationRequest(prompt_ids=ids, sampling=SamplingParams(max_new_tokens=0), score_from=0))


def test_response_probes_alone_give_every_token_its_projection(lm, engine):
    """Each token carries the projection of the state that produced it (the last prompt token's
    for the first), also when the request has no prefill probes at that layer."""
    ids = _prompt(lm, "Name a colour.")
    unit = torch.nn.functional.normalize(torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(0)), dim=-1)
    events = engine.add_request(_greedy(ids, 5, response_probes={19: unit}))
    while not _finished(events):
        engine.step()
    assert not any(isinstance(e, Exception) for e in events), events
    outs = [e for e in events if isinstance(e, TokenOut)]
    assert len(outs) == 5 and all(len(o.projections[19]) == 2 for o in outs)
    capture = engine.add_request(_greedy(ids, 0, capture_layers=frozenset({19})))
    while not _finished(capture):
        engine.step()
    state = next(e for e in capture if isinstance(e, PrefillDone)).states[19]
    assert outs[0].projections[19] == pytest.approx((unit @ state).tolist(), rel=1e-4, abs=1e-4)


def test_the_fused_forward_matches_the_hf_forward_with_steering_captures_and_scoring(lm):
    """The engine's fused Llama forward (steering.fastpath) gives the HF modules' results: the same
    greedy tokens for rows that steer, capture and score side by side in packed steps, states and
    log-probabilities equal up to the order of accumulation in the fused matrix products."""
    from steering.steer import RowSteering

    hf = Engine(lm, max_batch_size=4, max_num_batched_tokens=48, max_model_len=512, fused=False)
    fused = Engine(lm, max_batch_size=4, max_num_batched_tokens=48, max_model_len=512)
    try:
        assert hf.fused is None and fused.fused is not None
        unit = torch.nn.functional.normalize(torch.randn(1, lm.hidden_size, generator=torch.Generator().manual_seed(3)), dim=-1)
        push = unit[0] * 8.0
        long = _prompt(lm, "Tell me about rivers, lakes and the sea. " * 6)  # several 48-token chunks

        def run(engine):
            events = [
                engine.add_request(_greedy(_prompt(lm, "Name a colour."), 12,
                                           steering=RowSteering(prompt={12: push}, response={12: push}))),
                engine.add_request(_greedy(long, 6, capture_layers=frozenset({0, 15}), probes={15: unit},
                                           response_probes={20: unit})),
                engine.add_request(GenerationRequest(prompt_ids=long, sampling=SamplingParams(max_new_tokens=0),
                                                     score_from=10)),
            ]
            while not all(_finished(e) for e in events):
                engine.step()
            assert not any(isinstance(e, Exception) for ev in events for e in ev), events
            return events

        a, b = run(hf), run(fused)
        assert _tokens(a[0]) == _tokens(b[0]) and _tokens(a[1]) == _tokens(b[1])
        pa, pb = (next(e for e in ev if isinstance(e, PrefillDone)) for ev in (a[1], b[1]))
        for layer in (0, 15):
            assert torch.allclose(pa.states[layer], pb.states[layer], rtol=1e-3, atol=1e-3)
        assert pb.projections[15] == pytest.approx(pa.projections[15], abs=1e-2)
        ra = [o.projections[20][0] for o in a[1] if isinstance(o, TokenOut)]
        rb = [o.projections[20][0] for o in b[1] if isinstance(o, TokenOut)]
        assert rb == pytest.approx(ra, abs=1e-2)
        sa, sb = (next(e for e in ev if isinstance(e, PrefillDone)).prompt_logprobs for ev in (a[2], b[2]))
        assert len(sa) == len(sb) == len(long) - 10 and sb == pytest.approx(sa, abs=1e-3)
        # The steering took effect on both paths (it changes the steered row's tokens).
        plain = _solo(fused, _greedy(_prompt(lm, "Name a colour."), 12))
        assert plain != _tokens(b[0])
    finally:
        hf.hooks.remove()
        fused.hooks.remove()


def test_small_steps_keep_every_thread_in_float32_and_leave_one_in_bfloat16(lm):
    threads = torch.get_num_threads()
    engine = Engine(lm, max_batch_size=2, max_model_len=64)
    try:
        assert lm.dtype == torch.float32 and engine.small_step_threads == threads
    finally:
        engine.hooks.remove()
    engine = Engine(dataclasses.replace(lm, dtype=torch.bfloat16), max_batch_size=2, max_model_len=64)
    try:
        assert engine.small_step_threads == max(1, threads - 1)
        # 4 decoding rows keep a core for the event loop; 8 gained from every thread (docs/engine.md).
        assert engine._threads_for(engine_module._Step([object()] * 4, [])) == engine.small_step_threads
        assert engine._threads_for(engine_module._Step([object()] * 8, [])) == threads
    finally:
        engine.hooks.remove()


class _Unprintable(GenerationRequest):
    """A request whose formatting fails the test: serving it must never format it."""

    def __repr__(self) -> str:
        raise AssertionError("the engine formatted a request on its serving path")


def test_requests_are_never_formatted_on_the_serving_path_and_their_repr_is_short(lm):
    # A finished stream used to leave through deque.remove + ValueError, whose message is the
    # row's repr: every steering and probe tensor printed in full, milliseconds under the GIL per
    # request (measured as most of the event loop's time in a 32-request steered burst).
    steering = RowSteering(prompt={12: torch.ones(lm.hidden_size)}, response={12: torch.ones(lm.hidden_size)})
    probes = {15: torch.nn.functional.normalize(torch.randn(2, lm.hidden_size), dim=-1)}
    engine = Engine(lm, max_batch_size=1, max_waiting=4, max_model_len=512)
    engine.start()
    ids = _prompt(lm, "Say hi.")

    def unprintable(max_new: int) -> _Unprintable:
        return _Unprintable(prompt_ids=ids, steering=steering, probes=probes,
                            sampling=SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True))

    async def scenario():
        first = asyncio.ensure_future(_drain(engine.generate(unprintable(6))))
        while engine.running < 1:
            await asyncio.sleep(0.01)
        await _leave_while_queued(engine, unprintable(2))  # waits for the only slot, then leaves
        events = await first
        assert len(_tokens(events)) == 6 and isinstance(events[-1], Done)
        assert engine.waiting == 0

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        engine.shutdown()
        engine.hooks.remove()
    text = repr(GenerationRequest(prompt_ids=ids, steering=steering, probes=probes, request_id="r1"))
    assert "tensor(" not in text and len(text) < 200, text
    assert "r1" in text and f"prompt_tokens={len(ids)}" in text and "steering=[12]" in text and "probes=[15]" in text


def test_attention_writes_each_token_to_its_slot_and_matches_a_plain_reference():
    # Small shapes, no model: two decoding rows in non-adjacent slots (a gap at slot 1) and a chunk
    # that continues a cached prefix, against per-row attention computed by hand.
    torch.manual_seed(0)
    slots, kv_heads, group, head_dim, max_len = 3, 2, 2, 4, 16
    heads = kv_heads * group
    cache = kvcache.SlotKVCache(num_layers=1, slots=slots, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
                                dtype=torch.float32, device_of_layer=lambda _layer: torch.device("cpu"))
    cache.ensure(max_len)
    with pytest.raises(ValueError, match="max_len"):
        cache.ensure(max_len + 1)
    past = {0: 5, 2: 3, 1: 4}  # tokens already cached per slot
    for slot, n in past.items():
        cache.keys[0][slot, :, :n] = torch.randn(kv_heads, n, head_dim)
        cache.values[0][slot, :, :n] = torch.randn(kv_heads, n, head_dim)
    before_k, before_v = cache.keys[0].clone(), cache.values[0].clone()
    # Step: decode rows in slots 0 and 2 (one token each), then 3 prompt tokens of slot 1.
    tok_slots, tok_pos = [0, 2, 1, 1, 1], [5, 3, 4, 5, 6]
    total = len(tok_slots)
    query, key, value = (torch.randn(total, heads, head_dim), torch.randn(total, kv_heads, head_dim),
                         torch.randn(total, kv_heads, head_dim))
    lengths = [6, 1, 4]  # slot 1 takes no part in the decode call (position 0 only)
    width = max(lengths)
    layout = kvcache.StepLayout(
        cache=cache, slots=torch.tensor(tok_slots), positions=torch.tensor(tok_pos), num_decode=2,
        chunks=[kvcache.Chunk(start=2, end=5, slot=1, past=4)],
        decode_span=3, decode_dense=False, decode_slots=torch.tensor([0, 2]),
        decode_mask=(torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :])
    out = kvcache.attend(0, query, key, value, 0.5, layout)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for t, (s, p) in enumerate(zip(tok_slots, tok_pos)):
        expected_k[s, :, p], expected_v[s, :, p] = key[t], value[t]
    assert torch.equal(cache.keys[0], expected_k) and torch.equal(cache.values[0], expected_v)
    for t, (s, p) in enumerate(zip(tok_slots, tok_pos)):
        for h in range(heads):
            k, v = expected_k[s, h // group, : p + 1], expected_v[s, h // group, : p + 1]
            ref = torch.softmax(k @ query[t, h] * 0.5, dim=-1) @ v
            assert torch.allclose(out[t, h], ref, atol=1e-5), (t, h)
    if cpu_kernels.supported():  # the CPU kernel's per-token attention: the same numbers, and the same cache
        layout.kernels = cpu_kernels.load()
        assert torch.allclose(kvcache.attend(0, query, key, value, 0.5, layout), out, atol=1e-5)
        assert torch.equal(cache.keys[0], expected_k) and torch.equal(cache.values[0], expected_v)
