"""Small pure pieces: detokenization with stops, layer lookup, steering arithmetic, loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steering.detokenize import TextStream
from steering.layers import AttentionShape, UnsupportedArchitectureError, decoder_blocks
from steering.model import ModelLoadError, default_gguf_path, load_model
from steering.registry import VectorRegistry
from steering.steer import DeltaTable, SteeringError, SteeringSpec, resolve_steering
from steering.vector import ModelRef, PersonaVector, VectorFormatError, validate_name


def test_text_stream_holds_back_a_possible_stop_and_cuts_at_it(lm):
    tok = lm.tokenizer
    ids = tok("Hello world. Goodbye world.", add_special_tokens=False).input_ids
    ts = TextStream(tok, stop=("Goodbye",))
    sent = "".join(ts.push(i) for i in ids if not ts.stopped)
    assert ts.stopped
    assert sent == "Hello world. " == ts.text


@pytest.mark.parametrize(("text", "stop", "sent"), [
    ("Hello！World", "！", "Hello"),  # fullwidth "！" is two byte-level tokens here
    ("Party 🎉 time", "🎉", "Party "),  # three
    ("Say hi！ then go", "hi！", "Say "),  # the stop's start must not leak while its end is partial
])
def test_text_stream_stops_at_a_stop_ending_in_a_character_of_several_tokens(lm, text, stop, sent):
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the character really spans tokens
    ts = TextStream(tok, stop=(stop,))
    streamed = "".join(ts.push(i) for i in ids if not ts.stopped)
    assert ts.stopped
    assert streamed == sent == ts.text


@pytest.mark.parametrize("text", ["Plain text, all of it.", "Ünïcödé — emoji 🎉🎉 and 日本語のテキスト!  two  spaces\n\nlines"])
def test_text_stream_without_stops_streams_everything(lm, text):
    tok = lm.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    ts = TextStream(tok)
    streamed = [ts.push(i) for i in ids]
    assert "".join(streamed) + ts.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in streamed)  # partial characters are held back


def test_decoder_blocks_found_for_llama_and_refused_for_unknown(lm):
    assert len(decoder_blocks(lm.model)) == 30 == lm.num_layers
    with pytest.raises(UnsupportedArchitectureError, match="cannot find the decoder layers"):
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_attention_shape_reads_grouped_heads_and_an_explicit_head_size(lm):
    """The one derivation the KV cache, the fast path and the cost model share: KV heads default
    to the query heads, the head size to hidden / heads unless the config states it."""
    from transformers import GemmaConfig, GPT2Config, LlamaConfig

    assert AttentionShape.of(lm.model.config) == AttentionShape(heads=9, kv_heads=3, head_dim=64)
    assert AttentionShape.of(LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=None)) == \
        AttentionShape(heads=8, kv_heads=8, head_dim=32)
    assert AttentionShape.of(GemmaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                                         head_dim=96)).head_dim == 96
    assert AttentionShape.of(GPT2Config()) == AttentionShape(heads=12, kv_heads=12, head_dim=64)  # n_head, n_embd


def test_layer_convention_block_l_produces_hidden_state_l(lm):
    """hidden_states[L] (L < num_layers) is the output of block L (1-based): the convention vectors use."""
    seen = {}
    handle = lm.blocks[9].register_forward_hook(lambda m, a, o: seen.__setitem__(10, (o[0] if isinstance(o, tuple) else o).clone()))
    with torch.inference_mode():
        out = lm.model(torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    handle.remove()
    assert len(out.hidden_states) == lm.num_layers + 1
    assert torch.equal(out.hidden_states[10], seen[10])


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a..b"])
def test_unsafe_names_are_rejected(name):
    with pytest.raises(VectorFormatError):
        validate_name(name)


def test_resolve_steering_sums_units_and_phases(tmp_path):
    reg = VectorRegistry(tmp_path, model_name="m", fingerprint="f", num_layers=4, hidden_size=2)
    directions = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    reg.put(PersonaVector(name="v", directions=directions, model=ModelRef("m", "f", 4, 2), recommended_layer=1,
                          stats={"residual_norm": torch.tensor([1.0, 10.0, 10.0, 10.0, 10.0])}))
    row = resolve_steering([
        SteeringSpec("v", 2.0),                                  # raw at layer 1: (6, 8)
        SteeringSpec("v", 1.0, (1,), "response", "unit"),        # unit: (0.6, 0.8), response only
        SteeringSpec("v", 0.5, (2,), "prompt", "residual"),      # 0.5 * 10 * (0, 1)
    ], reg)
    assert torch.allclose(row.prompt[1], torch.tensor([6.0, 8.0]))
    assert torch.allclose(row.response[1], torch.tensor([6.6, 8.8]))
    assert torch.allclose(row.prompt[2], torch.tensor([0.0, 5.0]))
    assert 2 not in row.response
    table = DeltaTable(hidden_size=2, dtype=torch.float32, device_of_layer=lambda _l: "cpu")
    ids = table.add(row)
    assert sorted(table.layers()) == [1, 2] and set(ids) == {(1, "prompt"), (1, "response"), (2, "prompt")}
    assert torch.equal(table.tensor(1)[0], torch.zeros(2))  # entry 0: rows that do not steer the layer
    assert torch.allclose(table.tensor(1)[ids[(1, "response")]], torch.tensor([6.6, 8.8]))
    table.release(ids)
    assert table.layers() == []
    with pytest.raises(SteeringError) as err:
        resolve_steering([SteeringSpec("v", 1.0), SteeringSpec("v", 1.0, (5,))], reg)
    assert err.value.param == "steering[1].layers"


def test_gguf_path_loads_the_same_model_as_default(lm):
    again = load_model(str(default_gguf_path()), dtype="float32", device="cpu")
    assert again.fingerprint == lm.fingerprint and again.num_layers == lm.num_layers


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_machine_kind_names_the_cpu_and_the_instruction_sets_that_decide_our_dtype():
    from app.bench import machine_kind

    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nmodel name\t: other\n"
    assert machine_kind(avx2) == {"cpu_model": "AMD EPYC 7B13", "isa": ["avx2"], "kind": "AVX2"}
    bf16 = "model name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"
    assert machine_kind(bf16) == {"cpu_model": "AMD EPYC", "isa": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"],
                                  "kind": "AVX512-BF16"}
    assert machine_kind("flags\t: avx2 avx512f\n")["kind"] == "AVX-512"
