"""Steering and monitoring inside vLLM's forward pass: a worker extension of ours.

vLLM's engine process imports this module by path (``worker_extension_cls``) and mixes
:class:`PersonaWorkerExtension` into every worker; the server calls its methods through
``collective_rpc``. Nothing here is imported by the server process except the constants.

What a request asks for travels in ``SamplingParams.extra_args["persona"]`` (see
:func:`encode_request`): its summed steering delta per (layer, phase) and its monitor
directions, as float32 bytes. The request keeps the vectors it was admitted with, as on our
own engine, so a registry upload or delete reaches the workers with the next request and
never halfway through one.

Per forward pass, the first hooked layer reads the runner's flattened batch (request order,
``query_start_loc``, tokens computed before this step, prompt lengths) and builds, per
steered layer, a table of deltas and a per-token index into it (entry 0 is zeros). Each
decoder layer's forward hook then adds ``table[index]`` to its output; vLLM's decoder layers
return ``(hidden, residual)`` whose sum is the residual stream, so the delta goes into
``hidden``. Monitored layers project the last prompt token's residual state (and, for
response monitors, each fed-back generated token's) onto the request's directions on the
device. Results wait on tensor-parallel rank 0 until the server takes them
(:meth:`PersonaWorkerExtension.persona_take`); every rank steers. Hooks need eager
execution: compiled graphs and CUDA graphs do not call them.

A monitor's remediation (:class:`~steering.steer.ConditionalSteering`) is decided where the
last prompt token is read, on every rank (each reads the same replicated state): above its
limit, its deltas join the request's response-phase deltas from the next forward pass on. So,
as on our engine, the first generated token (sampled from the prefill's logits) is not
remediated and every later one is: the fed-back first token is the first position steered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

EXTRA_KEY = "persona"
EXTENSION = "steering.vllm_plugin.PersonaWorkerExtension"
PROMPT, RESPONSE = 0, 1
_RESULT_TTL_S = 300.0


def _pack(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def _unpack(blob: bytes, hidden: int) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(blob, dtype=np.float32).copy()).view(-1, hidden)


def encode_request(uid: str, hidden: int, *, prompt: dict[int, torch.Tensor], response: dict[int, torch.Tensor],
                   probes: dict[int, torch.Tensor], block_above: dict[int, torch.Tensor],
                   response_probes: dict[int, torch.Tensor], capture_layers: frozenset[int],
                   remediations: tuple = ()) -> dict:
    """The ``extra_args["persona"]`` value for one request (msgpack-friendly: str, int, bytes, lists).
    ``remediations`` are :class:`~steering.steer.ConditionalSteering`; their ``index`` counts
    rows of ``probes[layer]``."""
    return {
        "uid": uid,
        "hidden": hidden,
        "steer": [[layer, PROMPT, _pack(d)] for layer, d in prompt.items()]
        + [[layer, RESPONSE, _pack(d)] for layer, d in response.items()],
        "probes": [[layer, _pack(d)] for layer, d in probes.items()],
        "block": [[layer, [float(x) for x in limits]] for layer, limits in block_above.items()],
        "watch": [[layer, _pack(d)] for layer, d in response_probes.items()],
        "capture": sorted(capture_layers),
        "remedy": [[c.name, c.layer, c.index, float(c.limit), [[layer, _pack(d)] for layer, d in c.response.items()]]
                   for c in remediations],
    }


@dataclass(frozen=True)
class ChunkLayout:
    """Which of a request's scheduled tokens in one forward pass do what (offsets into the chunk)."""

    split: int  # the first response-phase token (the chunk's length when all are prompt tokens)
    last_prompt: int | None  # the last prompt token, when this pass is the prompt's first prefill
    produces: bool  # the last token's state yields a sampled token (vLLM discards the others')


def chunk_layout(computed: int, scheduled: int, prompt_len: int, num_tokens: int) -> ChunkLayout:
    """Where a request's chunk of ``scheduled`` tokens, after ``computed`` already in the KV cache,
    meets its prompt/response boundary; ``num_tokens`` is its prompt plus generated tokens so far.

    A token is sampled only from a chunk that reaches ``num_tokens``, vLLM's own rule: after a
    preemption vLLM recomputes the prompt and the generated tokens from position 0 in chunks, and
    those chunks pass the prompt's end without producing anything; nor do they read the last
    prompt token again (the request was read, and possibly blocked, before its first token).

    Example::

        chunk_layout(0, 5, 10, 13)    # a recompute chunk: split 5, last_prompt None, produces False
        chunk_layout(10, 3, 10, 13)   # its last one: split 0, produces True
    """
    end = computed + scheduled
    first_prefill = num_tokens == prompt_len and computed <= prompt_len - 1 < end
    return ChunkLayout(
        split=max(0, min(scheduled, prompt_len - computed)),
        last_prompt=prompt_len - 1 - computed if first_prefill else None,
        produces=end >= num_tokens,
    )


@dataclass(frozen=True)
class _Remedy:
    name: str
    layer: int
    index: int
    limit: float
    deltas: dict[int, torch.Tensor]  # layer -> [hidden], response phase


@dataclass
class _Spec:
    """A request's decoded ``persona`` arguments, its tensors on the worker's device."""

    uid: str
    deltas: dict[tuple[int, int], torch.Tensor]  # (layer, phase) -> [hidden]
    probes: dict[int, torch.Tensor]  # layer -> [M, hidden] float32
    block: dict[int, list[float]]
    watch: dict[int, torch.Tensor]
    capture: frozenset[int]
    remedies: list[_Remedy] = field(default_factory=list)

    @property
    def wants_prefill(self) -> bool:
        return bool(self.probes or self.capture)

    def remediate(self, remedy: _Remedy) -> None:
        """Add ``remedy``'s deltas to the response phase (the tables of later passes carry them)."""
        for layer, delta in remedy.deltas.items():
            held = self.deltas.get((layer, RESPONSE))
            self.deltas[(layer, RESPONSE)] = delta if held is None else held + delta


@dataclass
class _Step:
    """What one forward pass does per layer, built once from the runner's batch."""

    num_tokens: int
    index: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T] entry ids
    table: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [E, hidden]
    last_prompt: list[tuple[_Spec, int]] = field(default_factory=list)  # (spec, token index)
    fed_back: list[tuple[_Spec, int]] = field(default_factory=list)  # generated token fed this step
    layers: frozenset[int] = frozenset()
    remedy_layers: frozenset[int] = frozenset()  # layers where a remediation is decided (every rank)


class PersonaWorkerExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is vLLM's model runner."""

    def persona_install(self) -> dict:
        """Hook every decoder layer of the loaded model; returns facts about the model."""
        if getattr(self, "_persona_hooks", None):
            return self._persona_facts
        runner = self.model_runner
        model = runner.get_model()
        layers = _decoder_layers(model)
        self._persona_specs: dict[str, _Spec | None] = {}
        self._persona_step: _Step | None = None
        self._persona_active = False
        self._persona_results: dict[str, dict] = {}
        self._persona_hooks = [layer.register_forward_hook(self._persona_hook(i + 1)) for i, layer in enumerate(layers)]
        self._persona_rank0 = _tp_rank() == 0
        original = runner.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                self._persona_specs.pop(req_id, None)
            self._persona_step, self._persona_active = None, True
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                self._persona_active = False

        runner.execute_model = execute_model
        self._persona_facts = {"num_layers": len(layers), "device": str(next(model.parameters()).device)}
        return self._persona_facts

    def persona_take(self) -> dict[str, dict]:
        """Every result ready since the last call (rank 0 only; other ranks return {})."""
        out, self._persona_results = self._persona_results, {}
        now = time.monotonic()
        # A result nobody took (its request was cancelled) is not kept forever.
        return {uid: r for uid, r in out.items() if now - r["t"] < _RESULT_TTL_S}

    # ---- per step ----------------------------------------------------------------------------

    def _spec(self, req_id: str) -> _Spec | None:
        if req_id in self._persona_specs:
            return self._persona_specs[req_id]
        state = self.model_runner.requests.get(req_id)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
        raw = extra.get(EXTRA_KEY)
        spec = None
        if raw:
            device = self._persona_device()
            hidden = int(raw["hidden"])
            spec = _Spec(
                uid=raw["uid"],
                deltas={(int(layer), int(phase)): _unpack(blob, hidden)[0].to(device)
                        for layer, phase, blob in raw["steer"]},
                probes={int(layer): _unpack(blob, hidden).to(device) for layer, blob in raw["probes"]},
                block={int(layer): list(limits) for layer, limits in raw["block"]},
                watch={int(layer): _unpack(blob, hidden).to(device) for layer, blob in raw["watch"]},
                capture=frozenset(int(x) for x in raw["capture"]),
                remedies=[_Remedy(str(name), int(layer), int(index), float(limit),
                                  {int(at): _unpack(blob, hidden)[0].to(device) for at, blob in deltas})
                          for name, layer, index, limit, deltas in raw.get("remedy", ())],
            )
        self._persona_specs[req_id] = spec
        return spec

    def _persona_device(self) -> torch.device:
        return next(self.model_runner.get_model().parameters()).device

    def _build_step(self, dtype: torch.dtype, device: torch.device) -> _Step:
        runner = self.model_runner
        batch = runner.input_batch
        n = batch.num_reqs
        starts = np.asarray(runner.query_start_loc.np[: n + 1])
        step = _Step(num_tokens=int(starts[n]) if n else 0)
        rows: dict[int, list] = {}  # layer -> [(start, end, delta)]
        layers: set[int] = set()
        remedy_layers: set[int] = set()
        for i, req_id in enumerate(batch.req_ids[:n]):
            spec = self._spec(req_id)
            if spec is None:
                continue
            begin, end = int(starts[i]), int(starts[i + 1])
            if end <= begin:
                continue
            state = runner.requests[req_id]
            layout = chunk_layout(int(batch.num_computed_tokens_cpu[i]), end - begin, int(state.num_prompt_tokens),
                                  int(state.num_tokens))
            split = begin + layout.split
            for (layer, phase), delta in spec.deltas.items():
                lo, hi = (begin, split) if phase == PROMPT else (split, end)
                if hi > lo:
                    rows.setdefault(layer, []).append((lo, hi, delta))
            if spec.wants_prefill and layout.last_prompt is not None:
                step.last_prompt.append((spec, begin + layout.last_prompt))
                layers.update(spec.probes, spec.capture)
                remedy_layers.update(r.layer for r in spec.remedies)
            if spec.watch and layout.produces:
                # The state that produces this step's token: the last prompt token's in the step
                # that ends the prompt, the fed-back generated token's after it.
                step.fed_back.append((spec, end - 1))
                layers.update(spec.watch)
        for layer, spans in rows.items():
            index = np.zeros(step.num_tokens, dtype=np.int64)
            for entry, (lo, hi, _delta) in enumerate(spans, start=1):
                index[lo:hi] = entry
            table = torch.stack([torch.zeros_like(spans[0][2]), *(d for _lo, _hi, d in spans)])
            step.table[layer] = table.to(device, dtype)
            step.index[layer] = torch.from_numpy(index).to(device)
        step.layers = frozenset(layers)
        step.remedy_layers = frozenset(remedy_layers)
        return step

    def _persona_hook(self, layer: int):
        def hook(_module, _inputs, output):
            if not self._persona_active:
                return None
            hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output, None)
            step = self._persona_step
            if step is None:
                step = self._persona_step = self._build_step(hidden.dtype, hidden.device)
            if step.num_tokens == 0:
                return None
            # Readings see the layer's state before its own steering is added, as on our engine.
            if layer in step.layers and self._persona_rank0:
                self._observe(step, layer, hidden, residual)
            if layer in step.remedy_layers:
                self._remediate(step, layer, hidden, residual)
            if layer in step.table:
                t = step.num_tokens
                hidden[:t] += step.table[layer].index_select(0, step.index[layer])
            return None

        return hook

    def _prefill_result(self, spec: _Spec) -> dict:
        result = self._persona_results.setdefault(spec.uid, {"t": time.monotonic(), "tokens": []})
        return result.setdefault("prefill", {"projections": {}, "states": {}, "blocked": False, "remediated": []})

    def _remediate(self, step: _Step, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Switch on the remediations decided at ``layer`` whose probe reads above their limit."""
        for spec, token in step.last_prompt:
            due = [r for r in spec.remedies if r.layer == layer]
            if not due:
                continue
            values = spec.probes[layer] @ _state(hidden, residual, token)
            for remedy in due:
                if float(values[remedy.index]) > remedy.limit:
                    spec.remediate(remedy)
                    if self._persona_rank0:
                        self._prefill_result(spec)["remediated"].append(remedy.name)

    def _observe(self, step: _Step, layer: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        now = time.monotonic()
        for spec, token in step.last_prompt:
            if layer not in spec.probes and layer not in spec.capture:
                continue
            prefill = self._prefill_result(spec)
            s = _state(hidden, residual, token)
            if layer in spec.probes:
                values = (spec.probes[layer] @ s).tolist()
                prefill["projections"][layer] = values
                limits = spec.block.get(layer)
                if limits and any(v > lim for v, lim in zip(values, limits)):
                    prefill["blocked"] = True
            if layer in spec.capture:
                prefill["states"][layer] = _pack(s)
        for spec, token in step.fed_back:
            if layer not in spec.watch:
                continue
            result = self._persona_results.setdefault(spec.uid, {"t": now, "tokens": []})
            values = (spec.watch[layer] @ _state(hidden, residual, token)).tolist()
            # One entry per fed-back token: hooks run in layer order, so the lowest watched layer opens it.
            if layer == min(spec.watch):
                result["tokens"].append({})
            result["tokens"][-1][layer] = values


def _state(hidden: torch.Tensor, residual: torch.Tensor | None, token: int) -> torch.Tensor:
    """The residual stream at ``token`` in float32 (vLLM's layers return it as two summands)."""
    s = hidden[token] if residual is None else hidden[token] + residual[token]
    return s.float()


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a vLLM model, in order (``model.model.layers`` for Llama-like ones)."""
    for path in ("model.layers", "language_model.model.layers", "transformer.h", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}")


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - not initialised: a single worker
        return 0
