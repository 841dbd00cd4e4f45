"""Batch invariance in the dtype the server runs by default here (bfloat16 on AVX512-BF16 CPUs,
float32 elsewhere): a row's greedy tokens are the same alone and beside any other rows; and
sliding-window attention and logit soft-capping give what the HF forward gives."""

from __future__ import annotations

import concurrent.futures
import copy
import threading

import httpx
import pytest
import torch

from steering import cpu_kernels
from steering.cpu_linear import prepack_linears
from steering.engine import Engine, GenerationRequest, PrefillDone, TokenOut
from steering.layers import decoder_blocks
from steering.model import LoadedModel, cpu_has_native_bf16, load_model
from steering.sampling import SamplingParams
from tests.conftest import CACHE_DIR, make_server

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="no AVX2 or no C++ compiler here")

TEXTS = [
    "Describe your morning.", "What is the capital of France?", "Tell me about your job.",
    "Write a short poem about rain.", "How do you feel about the next year?", "Give me a tip for cooking rice.",
    "Why is the sky blue?", "Name three animals that live in the sea.", "What makes a good friend?",
    "Explain how a bicycle works.", "Describe the smell of bread.", "What should I read next?",
    "How do bees make honey?", "Plan a rainy Sunday for me.", "What is your favourite season?",
    "Tell me about the moon.", "How do I stay calm before an exam?", "Describe a busy train station.",
    "What do cats dream about?", "Give me advice about saving money.",
]
STEERINGS = [
    None, {"optimistic": 1.5}, [{"vector": "evil", "coefficient": 1.0, "layers": [15]}],
    [{"vector": "optimistic", "coefficient": -2.0, "positions": "response"}],
    [{"vector": "optimistic", "coefficient": 3.0, "positions": "prompt"}],
]
LONG = "Tell me about rivers, lakes and the sea, and the people who live beside them. " * 40  # > 512 tokens


def _cases() -> list[dict]:
    """26 requests: 20 chats (steered and not), coefficient 0 beside its unsteered twin, 3 text
    completions (one steered), a chat with n=2, and a prompt prefilled in chunks."""
    cases = [{"path": "chat", "text": t, "steering": STEERINGS[i % len(STEERINGS)]} for i, t in enumerate(TEXTS)]
    cases.append({"path": "chat", "text": TEXTS[0], "steering": {"optimistic": 0}, "same_as": 0})
    cases += [{"path": "completions", "text": t, "steering": s} for t, s in
              (("The weather today is", None), ("Once upon a time", {"optimistic": 1.0}), ("My plan is", None))]
    cases.append({"path": "chat", "text": TEXTS[3], "steering": {"optimistic": 1.0}, "n": 2})
    cases.append({"path": "chat", "text": LONG, "steering": None})
    return cases


def _send(client: httpx.Client, case: dict) -> list[str]:
    body = {"model": "default", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "n": case.get("n", 1)}
    if case["steering"] is not None:
        body["steering"] = case["steering"]
    if case["path"] == "chat":
        body["messages"] = [{"role": "user", "content": case["text"]}]
        response = client.post("/v1/chat/completions", json=body)
    else:
        body["prompt"] = case["text"]
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    return [c["message"]["content"] if case["path"] == "chat" else c["text"] for c in choices]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    lm = load_model("default", device="cpu", cache_dir=CACHE_DIR)  # the server's default dtype here
    assert lm.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert lm.kernels is not None
    with make_server(lm, tmp_path_factory.mktemp("data")) as live:
        yield live


def test_every_row_gets_its_solo_tokens_in_batches_of_2_8_and_32_with_mixed_steering(default_server):
    cases = _cases()
    with httpx.Client(base_url=default_server.url, timeout=600) as client:
        alone = [_send(client, case) for case in cases]
        assert alone[20] == alone[0]  # coefficient 0 is the unsteered text
        assert alone[24][0] == alone[24][1]  # greedy: both choices alike
        assert len(set(map(tuple, alone))) > 15  # the prompts and steerings differ, so do their texts
        for size, start in ((2, 19), (8, 3), (32, 0)):
            picked = [(start + i) % len(cases) for i in range(size)]
            barrier = threading.Barrier(size)

            def run(k, client=client, barrier=barrier):
                barrier.wait()
                return _send(client, cases[k])

            with concurrent.futures.ThreadPoolExecutor(size) as pool:
                batched = list(pool.map(run, picked))
            differing = [(k, cases[k]["text"][:40], cases[k]["steering"]) for k, got in zip(picked, batched)
                         if got != alone[k]]
            assert not differing, (size, differing)


# ---- sliding windows and soft-capping against the HF forward (tiny random models) ------------

WINDOW = 8


def _tiny(family: str, vocab: int, window: int = WINDOW, softcap: float | None = 2.0):
    torch.manual_seed(0)
    if family == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        config = MistralConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                               max_position_embeddings=256, tie_word_embeddings=False, attn_implementation="eager")
        return MistralForCausalLM(config).eval().requires_grad_(False)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Large weights, so the scores reach the cap and the cap changes them.
    config = Gemma2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=window,
                          attn_logit_softcapping=softcap, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                          max_position_embeddings=256, initializer_range=0.3, attn_implementation="eager")
    return Gemma2ForCausalLM(config).eval().requires_grad_(False)


def _reference(model, ids: list[int], new: int) -> tuple[torch.Tensor, list[int]]:
    """The HF forward's log-probabilities of each prompt token after the first, and its greedy tokens."""
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        scored = logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        out = list(ids)
        for _ in range(new):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
    return scored, out[len(ids):]


def _engine_run(model, tokenizer, kernels, ids: list[int], new: int):
    lm = LoadedModel(model=model, tokenizer=tokenizer, name="tiny", fingerprint="tiny", num_layers=2, hidden_size=64,
                     context_length=256, dtype=torch.float32, blocks=decoder_blocks(model), kernels=kernels)
    # 16-token steps: the 40-token prompt is read in chunks, each after what its slot has cached.
    engine = Engine(lm, max_batch_size=2, max_num_batched_tokens=16, max_model_len=128)
    try:
        events = engine.add_request(GenerationRequest(prompt_ids=ids, score_from=1, sampling=SamplingParams(
            max_new_tokens=new, temperature=0, ignore_eos=True)))
        while engine.step():
            pass
    finally:
        engine.hooks.remove()
    prefill = next(e for e in events if isinstance(e, PrefillDone))
    return torch.tensor(prefill.prompt_logprobs), [e.token_id for e in events if isinstance(e, TokenOut)], engine


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_and_softcap_match_the_hf_forward_past_the_window(lm, family):
    vocab = len(lm.tokenizer)
    base = _tiny(family, vocab)
    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(1)).tolist()  # 5 windows
    want, want_tokens = _reference(base, ids, 6)
    windowless = _tiny(family, vocab, window=len(ids) + 8, softcap=None)  # the same weights
    assert (_reference(windowless, ids, 0)[0] - want).abs().max() > 1e-2  # the window matters here
    if family == "gemma2":  # and so does the cap
        assert (_reference(_tiny(family, vocab, softcap=None), ids, 0)[0] - want).abs().max() > 1e-2
    fused = family == "mistral"  # Mistral runs the engine's fused forward, Gemma 2 the HF one
    model = copy.deepcopy(base)
    prepack_linears(model, kernels=True, pack=False)
    got, tokens, engine = _engine_run(model, lm.tokenizer, cpu_kernels.load(), ids, 6)
    assert (engine.fused is not None) == fused
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    assert tokens == want_tokens
    if fused:  # without our kernels: SDPA with the window in its masks
        got, tokens, _engine = _engine_run(copy.deepcopy(base), lm.tokenizer, None, ids, 6)
        assert (got - want).abs().max() < 1e-4 and tokens == want_tokens
    else:  # SDPA cannot cap scores: refused at once, with the reason
        with pytest.raises(ValueError, match="attn_logit_softcapping"):
            _engine_run(copy.deepcopy(base), lm.tokenizer, None, ids, 6)
