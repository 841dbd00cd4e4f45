"""``--quantization int8``: the int8 kernel's arithmetic, its batch invariance, what quantizing the
default model does to its answers, steering, monitors and adapters, and the startup refusals."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from steering import cpu_kernels
from steering.chat import chat_prompt_ids, text_ids
from steering.engine import Engine
from steering.extract import coefficient_sweep, unit_rows
from steering.model import ModelLoadError, load_model
from steering.quant import QuantLinear, quantize_int8
from steering.runner import EngineRunner
from steering.vector import PersonaVector
from tests.conftest import CACHE_DIR, REPO_VECTORS, answer, make_server

pytestmark = pytest.mark.skipif(not cpu_kernels.supported(), reason="no AVX2 or no C++ compiler here")

EVIDENCE = json.loads((REPO_VECTORS / "evidence.json").read_text())
QUESTIONS = [q for group in EVIDENCE["questions"].values() for q in group]
NEUTRAL = json.loads((REPO_VECTORS / "neutral_prompts.json").read_text())["prompts"]
ADAPTER = REPO_VECTORS / "SmolLM2-135M-Instruct" / "adapters" / "big5-extraversion-high"


@pytest.fixture(scope="module")
def kernels():
    return cpu_kernels.load()


@pytest.fixture(scope="module")
def qlm():
    """The default model with int8 weights: the session's one second model load."""
    return load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, quantization="int8")


@pytest.fixture(scope="module")
def qrunner(qlm):
    engine = Engine(qlm, max_batch_size=32, max_waiting=4096)
    engine.start()
    yield EngineRunner(engine)
    engine.shutdown()


def _layer(out: int, k: int, bias: bool, kernels) -> tuple[QuantLinear, torch.Tensor]:
    linear = torch.nn.Linear(k, out, bias=bias)
    return QuantLinear.of(linear, kernels), linear.weight.detach()


def test_quantize_int8_is_within_half_a_step_and_survives_a_zero_row():
    weight = torch.randn(6, 40)
    weight[2] = 0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert scale[2] == 0 and (q[2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(17, 100), (96, 576), (5, 7)])
def test_int8_product_matches_a_float64_reference(kernels, dtype, shape):
    """Against the dequantized weight times the input in float64: float32 within 1e-5 of the sum
    of the products' magnitudes (a chain of float32 roundings over at most 576 terms), bfloat16
    within that plus one bfloat16 rounding of the result (2^-8 relative)."""
    torch.manual_seed(1)
    layer, _ = _layer(*shape, bias=True, kernels=kernels)
    x = torch.randn(9, shape[1]).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    w = layer.dequantized().double()
    reference = x.double() @ w.T + layer.bias.double()
    scale = x.double().abs() @ w.abs().T + layer.bias.double().abs()
    limit = 1e-5 * scale + (2.0 ** -8 * reference.abs() if dtype == torch.bfloat16 else 0)
    assert ((out.double() - reference).abs() <= limit + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(36, 224), (36, 208), (29, 203)])
def test_int8_product_is_batch_invariant(kernels, dtype, shape):
    """Each row alone and in every call of 1..33 rows: bitwise the same, for weights stored in
    blocks (in-features a multiple of 32: bfloat16 inputs take the VDPBF16PS chain where the CPU
    has it; of 16 only: the float32 chain) and one too odd for them (every tile shape, the tail)."""
    torch.manual_seed(2)
    layer, _ = _layer(*shape, bias=False, kernels=kernels)
    assert layer.weight.dim() == (4 if shape[0] % 4 == 0 and shape[1] % 16 == 0 else 2)
    x = torch.randn(33, shape[1]).to(dtype)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(33)])
    for rows in range(1, 34):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


def test_every_linear_layer_is_int8_and_the_tied_embedding_keeps_its_weight(qlm, lm):
    linears = [m for m in qlm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, QuantLinear) and m.weight.dtype == torch.int8 for m in linears)
    head = qlm.model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.out_features == qlm.model.config.vocab_size
    embedding = qlm.model.get_input_embeddings().weight
    assert embedding.dtype == torch.float32 and torch.equal(embedding, lm.model.get_input_embeddings().weight)


def test_greedy_answers_and_perplexity_stay_close(qlm, qrunner, runner):
    """The first 16 greedy tokens of the 64 evidence questions: equal to the unquantized model's on
    at least 45% (measured 52% in float32; bfloat16 against float32 gives 69%, see
    docs/quantization.md); perplexity of the 120 neutral prompts within 3%."""
    tok = qlm.tokenizer
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    base = asyncio.run(runner.generate(prompts, max_new_tokens=16))
    quantized = asyncio.run(qrunner.generate(prompts, max_new_tokens=16))
    assert sum(a == b for a, b in zip(base, quantized)) >= 0.45 * len(prompts)
    texts = [text_ids(tok, t) for t in NEUTRAL]

    def perplexity(on: EngineRunner) -> float:
        rows = asyncio.run(on.token_logprobs(texts, [1] * len(texts)))
        return float(torch.tensor([v for row in rows for v in row]).mean().neg().exp())

    assert abs(perplexity(qrunner) / perplexity(runner) - 1) <= 0.03


def test_steering_moves_the_projection_monotonically(qlm, qrunner):
    vector = PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / "optimistic.safetensors")
    layer = vector.recommended_layer
    sweep = asyncio.run(coefficient_sweep(qrunner, qlm.tokenizer, vector.directions, layer, QUESTIONS[:8],
                                          grid=(1.0, 2.0)))
    projections = [row["projection"] for row in sweep]  # coefficients -2, -1, 0, 1, 2
    assert projections == sorted(projections) and len(set(projections)) == 5, sweep


def test_monitor_projections_stay_within_a_quarter_of_their_spread(qlm, qrunner, runner):
    """The last prompt token's projection on a shipped vector (what a monitor reads): each of 40
    prompts within 0.25 standard deviations (across the prompts) of its unquantized value
    (measured: 0.16 at most)."""
    vector = PersonaVector.load(REPO_VECTORS / "SmolLM2-135M-Instruct" / "optimistic.safetensors")
    layer = vector.recommended_layer
    unit = unit_rows(vector.directions)[layer]
    prompts = [chat_prompt_ids(qlm.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS[:40]]
    base = asyncio.run(runner.last_states(prompts, [layer])).reshape(len(prompts), -1) @ unit
    quantized = asyncio.run(qrunner.last_states(prompts, [layer])).reshape(len(prompts), -1) @ unit
    assert float((quantized - base).abs().max()) <= 0.25 * float(base.std())


def test_a_quantized_server_steers_and_serves_a_lora_adapter(qlm, tmp_path):
    """Over HTTP: the adapter's deltas are added after the int8 products and change the answers."""
    with make_server(qlm, tmp_path, lora_modules=[f"extravert={ADAPTER}"]) as live, \
            httpx.Client(base_url=live.url, timeout=300) as client:
        prompts = ["Describe your ideal weekend.", "Tell me about your job.", "What makes a good friend?"]
        base = [answer(client, p, max_tokens=24) for p in prompts]
        adapted = [answer(client, p, max_tokens=24, model="extravert") for p in prompts]
        steered = [answer(client, p, max_tokens=24, steering={"optimistic": 2.0}) for p in prompts]
        assert sum(a != b for a, b in zip(base, adapted)) >= 2
        assert sum(a != b for a, b in zip(base, steered)) >= 2


def test_load_model_refuses_int8_without_the_kernels():
    with pytest.raises(ModelLoadError, match="--quantization int8 runs on our CPU kernels"):
        load_model("default", dtype="float32", device="cpu", cache_dir=CACHE_DIR, cpu_kernels=False,
                   quantization="int8")


@pytest.mark.parametrize(("args", "env", "says"), [
    (["--engine", "vllm"], {}, "not vLLM's"),
    ([], {"PERSONA_CPU_KERNELS": "0"}, "PERSONA_CPU_KERNELS=0"),
])
def test_serve_refuses_int8_where_our_kernels_do_not_run(tmp_path, args, env, says):
    """One line on stderr and a failed exit, before any model loads."""
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--quantization", "int8", *args],
                            env={**os.environ, "PERSONA_DATA_DIR": str(tmp_path), **env}, capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("persona-server: --quantization int8") and says in lines[0], lines
