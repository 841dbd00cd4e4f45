"""The vLLM backend: our engine interface on vLLM's ``AsyncLLM``, steering and monitors done by
our worker extension (:mod:`steering.vllm_plugin`) inside vLLM's forward pass.

It takes the same :class:`~steering.engine.GenerationRequest` and yields the same events as
:class:`steering.engine.Engine`: ``PrefillDone`` (with the last prompt token's projections,
read from the workers before the first token is passed on), ``TokenOut`` per token, ``Done``.
A request whose projection crosses an enforced ``block_above`` limit is aborted before any
of its tokens is yielded and ends ``blocked``, as on our engine.

Per-request steering changes the KV cache, so a steered request's prefix-cache key is salted
with a hash of its steering, and of where its prompt ends when the prompt and the response are
steered differently: vLLM never reuses blocks computed under other steering.

A request's LoRA adapter travels as vLLM's own ``LoRARequest`` (LoRA is enabled in vLLM's engine
when ``max_loras`` > 0). vLLM's workers read an adapter from disk when they first schedule it, and
may read it again after evicting it, so the engine serves each :class:`~steering.adapters.Adapter`
object from a copy of its own, checked against the object: replacing or unloading the adapter in
the store never changes what a request admitted with it runs with. Each copy has its own vLLM id
and name, so the prefix cache (keyed by vLLM on the adapter's name and path) never mixes them.

A monitor's remediation is decided by the workers where they read the last prompt token, as on
our engine: the first generated token, sampled from the prefill's logits, is not remediated;
every later one is (:mod:`steering.vllm_plugin`). ``PrefillDone.remediated`` names the
remediations switched on, read with the projections before the first token is passed on.

Not supported here (they raise :class:`UnsupportedOnEngineError`): ``mean_from`` (all-layer
span means for extraction), ``option_ids`` (assessment) and ``score_from``; the CLI runs them on
our engine.

Example::

    engine = VLLMEngine(lm, model_dir=Path("~/.cache/persona-server/smollm2"), dtype="float32")
    engine.start()
    async for event in engine.generate(GenerationRequest(prompt_ids=ids)):
        ...
    engine.shutdown()
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from steering.adapters import Adapter, read_adapter
from steering.engine import (
    Done,
    DrainingError,
    EngineDeadError,
    EngineError,
    GenerationRequest,
    PrefillDone,
    QueueFullError,
    RequestTooLongError,
    TokenOut,
    UnsupportedOnEngineError,
)
from steering.model import LoadedModel
from steering.vllm_plugin import EXTENSION, EXTRA_KEY, PROMPT, RESPONSE, encode_request

log = logging.getLogger(__name__)


class VLLMEngine:
    """One ``AsyncLLM`` with our worker extension, behind our engine interface."""

    name = "vllm"

    def __init__(self, lm: LoadedModel, *, model_dir: Path, max_batch_size: int = 32, max_waiting: int = 256,
                 max_model_len: int | None = None, max_num_batched_tokens: int = 512, dtype: str = "auto",
                 tensor_parallel_size: int = 1, enforce_eager: bool = True, kv_cache_gib: float = 4.0,
                 gpu_memory_utilization: float = 0.9, prefix_caching: bool = True, adapter_dir: Path | None = None,
                 max_loras: int = 0, max_lora_rank: int = 64):
        """``adapter_dir`` is the adapter store's root (``<dir>/<name>/`` holds PEFT's files);
        ``max_loras`` > 0 enables LoRA in vLLM, that many adapters in one batch, ranks up to
        ``max_lora_rank`` (rounded up to a rank vLLM accepts)."""
        self.lm = lm
        # Work that needs what only our engine reports (all-layer span means, option log-probabilities).
        self.unsupported = frozenset({"extraction", "assessment"} | (set() if max_loras > 0 else {"adapters"}))
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._lora_root: Path | None = None
        self._loras: weakref.WeakKeyDictionary[Adapter, object] = weakref.WeakKeyDictionary()
        self._lora_ids = itertools.count(1)
        self._lora_lock = threading.Lock()
        self.model_dir = Path(model_dir)
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.max_model_len = int(min(max_model_len or lm.context_length, lm.context_length))
        self.max_num_batched_tokens = max(max_num_batched_tokens, max_batch_size)
        self.dtype = dtype
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.gpu_memory_utilization = gpu_memory_utilization
        self.prefix_caching = prefix_caching
        self.forward_passes = 0  # not counted on this engine
        self._llm = None
        self._uids = itertools.count()
        self._running = 0
        self._draining = False
        self._stopped = False
        self._results: dict[str, tuple[float, dict]] = {}
        self._fetch: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        raise EngineError("the vLLM engine starts inside the server's event loop: await astart()")

    async def astart(self) -> None:
        """Start vLLM's engine process in this event loop and hook its workers (it loads the model)."""
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if not torch.cuda.is_available():
            # vLLM's CPU backend reads its KV budget and core binding from the environment.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        lora = {}
        if self.max_loras > 0:
            # Twice as many held as served in one batch: a replaced adapter's old copy may still
            # be running beside the new one.
            lora = dict(enable_lora=True, max_loras=self.max_loras, max_cpu_loras=2 * self.max_loras,
                        max_lora_rank=_vllm_rank(self.max_lora_rank))
        args = AsyncEngineArgs(
            model=str(self.model_dir), dtype=self.dtype, max_model_len=self.max_model_len,
            max_num_seqs=self.max_batch_size, max_num_batched_tokens=self.max_num_batched_tokens,
            tensor_parallel_size=self.tensor_parallel_size, enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.prefix_caching, worker_extension_cls=EXTENSION,
            gpu_memory_utilization=self.gpu_memory_utilization, disable_log_stats=True, **lora,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        facts = await self._llm.collective_rpc("persona_install")
        if facts[0]["num_layers"] != self.lm.num_layers:
            raise EngineError(f"vLLM's model has {facts[0]['num_layers']} decoder layers, ours {self.lm.num_layers}")
        log.info("vLLM engine ready: %s, eager=%s, tensor parallel %d", self.model_dir, self.enforce_eager,
                 self.tensor_parallel_size)

    def drain(self) -> None:
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
            self._lora_root = None

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return 0  # vLLM keeps its own queue; requests in it count as running here

    @property
    def alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    # ---- requests ----------------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestTooLongError("the prompt is empty")
        if n + max(1, request.sampling.max_new_tokens) > self.max_model_len:
            raise RequestTooLongError(
                f"the prompt has {n} tokens and {request.sampling.max_new_tokens} more were asked for; "
                f"this server's max_model_len is {self.max_model_len}")
        if request.score_from is not None:
            raise UnsupportedOnEngineError("prompt scoring (the extraction sweep's fluency) runs on the hf engine only")
        if request.mean_from is not None:
            raise UnsupportedOnEngineError("span means (vector extraction) run on the hf engine only")
        if request.option_ids:
            raise UnsupportedOnEngineError("option log-probabilities (assessment) run on the hf engine only")
        if request.adapter is not None and self.max_loras <= 0:
            raise UnsupportedOnEngineError("LoRA adapters are off on this vLLM engine; start it with --enable-lora "
                                           "(PERSONA_ENABLE_LORA=true) or --lora-modules", param="model")

    def _sampling(self, request: GenerationRequest, extra: dict | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = request.sampling
        return SamplingParams(
            n=1, max_tokens=max(1, p.max_new_tokens), temperature=0.0 if p.greedy else p.temperature,
            top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else 0, min_p=p.min_p,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, seed=_vllm_seed(p.seed),
            stop_token_ids=list(p.stop_token_ids), min_tokens=p.min_tokens, ignore_eos=p.ignore_eos,
            logprobs=p.logprobs, logit_bias=dict(p.logit_bias) or None, detokenize=False,
            skip_special_tokens=False, output_kind=RequestOutputKind.DELTA,
            extra_args={EXTRA_KEY: extra} if extra else None,
        )

    def _persona_args(self, request: GenerationRequest, uid: str) -> dict | None:
        steering = request.steering
        prompt = steering.prompt if steering else {}
        response = steering.response if steering else {}
        if not (prompt or response or request.probes or request.response_probes or request.capture_layers):
            return None
        return encode_request(uid, self.lm.hidden_size, prompt=prompt, response=response, probes=request.probes,
                              block_above=request.block_above, response_probes=request.response_probes,
                              capture_layers=request.capture_layers, remediations=request.remediations)

    async def generate(self, request: GenerationRequest):
        """Submit ``request`` and yield its events; closing the stream aborts it in vLLM."""
        from vllm.inputs import TokensPrompt

        if self._llm is None or self._stopped:
            raise EngineDeadError("the generation engine has stopped; the server must be restarted")
        if self._llm.errored:
            raise EngineDeadError("vLLM's engine has stopped; the server must be restarted")
        if self._draining:
            raise DrainingError("the server is shutting down; retry on another replica")
        self.check(request)
        if self._running >= self.max_batch_size + self.max_waiting:
            raise QueueFullError(self._running - self.max_batch_size)
        uid = f"persona-{next(self._uids)}-{request.request_id or 'r'}"
        extra = self._persona_args(request, uid)
        prompt = TokensPrompt(prompt_token_ids=list(request.prompt_ids))
        if extra and (extra["steer"] or extra["remedy"]):
            # Never reuse prefix-cache blocks computed under another steering.
            prompt["cache_salt"] = _salt(extra["steer"], len(request.prompt_ids), extra["remedy"])
        needs_prefill = bool(request.probes or request.capture_layers)
        watching = bool(request.response_probes)
        prefill_only = request.sampling.max_new_tokens == 0
        submitted = time.monotonic()
        lora = await self._lora_request(request.adapter) if request.adapter is not None else None
        stream = self._llm.generate(prompt, self._sampling(request, extra), uid, lora_request=lora)
        self._running += 1
        finished = False
        try:
            first = True
            emitted = 0
            watched: list = []
            async for out in stream:
                completion = out.outputs[0]
                if first:
                    first = False
                    event = PrefillDone(states={}, projections={}, queue_wait_s=_queue_wait(out, submitted))
                    if needs_prefill:
                        prefill = (await self._take(uid, lambda r: "prefill" in r)).get("prefill", {})
                        event.projections = {int(k): v for k, v in prefill.get("projections", {}).items()}
                        hidden = self.lm.hidden_size
                        event.states = {int(k): torch.from_numpy(np.frombuffer(v, dtype=np.float32).copy()).view(hidden)
                                        for k, v in prefill.get("states", {}).items()}
                        event.blocked = bool(prefill.get("blocked"))
                        if not event.blocked:
                            event.remediated = tuple(prefill.get("remediated", ()))
                    yield event
                    if event.blocked or prefill_only:
                        await self._llm.abort(uid)
                        finished = True
                        yield Done("blocked" if event.blocked else "length", len(request.prompt_ids), 0)
                        return
                tokens = list(completion.token_ids)
                logprobs = completion.logprobs or []
                if watching and tokens:
                    # Token k carries the projection of the state that produced it (the last
                    # prompt token's for k = 0, generated token k-1's after that), as on our engine.
                    need = emitted + len(tokens)
                    while len(watched) < need:
                        got = await self._take(uid, lambda r: len(r.get("tokens", ())) > 0, merge=True)
                        watched.extend(got.get("tokens", ()))
                for j, token in enumerate(tokens):
                    lp, top = None, None
                    if request.sampling.logprobs is not None and j < len(logprobs) and logprobs[j]:
                        entry = logprobs[j]
                        lp = float(entry[token].logprob) if token in entry else None
                        top = sorted(((int(t), float(v.logprob)) for t, v in entry.items()),
                                     key=lambda kv: -kv[1])[: request.sampling.logprobs]
                    projections = None
                    k = emitted + j
                    if watching and k < len(watched):
                        projections = {int(layer): v for layer, v in watched[k].items()}
                    yield TokenOut(int(token), lp, top, projections)
                emitted += len(tokens)
                if out.finished:
                    finished = True
                    reason = completion.finish_reason or "stop"
                    if reason not in ("stop", "length"):
                        raise EngineError(f"vLLM ended the request: {reason}")
                    yield Done(reason, len(request.prompt_ids), emitted)
                    return
            raise EngineError("vLLM's stream ended without finishing the request")
        finally:
            self._running -= 1
            self._results.pop(uid, None)
            if not finished and self._llm is not None:
                try:
                    await self._llm.abort(uid)
                except Exception:  # noqa: BLE001 - the engine may be gone; nothing left to abort
                    pass

    # ---- adapters ----------------------------------------------------------------------------

    async def _lora_request(self, adapter: Adapter):
        """vLLM's ``LoRARequest`` for ``adapter``: made on its first use, from a private copy of
        its files that lives as long as the object (its last request ends after its unloading)."""
        with self._lora_lock:
            held = self._loras.get(adapter)
        if held is None:
            held = await asyncio.to_thread(self._copy_adapter, adapter)
        return held

    def _copy_adapter(self, adapter: Adapter):
        from vllm.lora.request import LoRARequest

        with self._lora_lock:
            held = self._loras.get(adapter)
            if held is not None:
                return held
            if self.adapter_dir is None:
                raise UnsupportedOnEngineError("this vLLM engine was started without an adapter store", param="model")
            if self._lora_root is None:
                self._lora_root = Path(tempfile.mkdtemp(prefix="persona-vllm-lora-"))
            number = next(self._lora_ids)
            copy = self._lora_root / str(number)
            try:
                shutil.copytree(self.adapter_dir / adapter.name, copy)
                same = _same_adapter(read_adapter(copy, self.lm, name=adapter.name, max_rank=adapter.rank), adapter)
            except (OSError, ValueError) as exc:
                shutil.rmtree(copy, ignore_errors=True)
                raise EngineError(f"adapter {adapter.name!r} could not be handed to vLLM: {exc}") from exc
            if not same:
                # The store replaced the adapter after this request was admitted with it.
                shutil.rmtree(copy, ignore_errors=True)
                raise EngineError(f"adapter {adapter.name!r} was replaced while this request was admitted; send it again")
            held = LoRARequest(lora_name=f"{adapter.name}#{number}", lora_int_id=number, lora_path=str(copy))
            self._loras[adapter] = held
            weakref.finalize(adapter, shutil.rmtree, copy, True)
            return held

    # ---- results from the workers ------------------------------------------------------------

    async def _take(self, uid: str, ready, *, merge: bool = False, timeout: float = 60.0) -> dict:
        """This request's results from the workers once ``ready(result)`` holds. One RPC at a time
        serves every waiting request (results of all requests come back together)."""
        deadline = time.monotonic() + timeout
        while True:
            held = self._results.get(uid)
            if held is not None and ready(held[1]):
                if merge:
                    # Streams of per-token results are consumed as they are handed over.
                    self._results.pop(uid)
                return held[1]
            if time.monotonic() > deadline:
                raise EngineError(f"the workers did not report request {uid}'s monitor readings")
            if self._fetch is None or self._fetch.done():
                self._fetch = asyncio.ensure_future(self._pull())
            await asyncio.shield(self._fetch)

    async def _pull(self) -> None:
        replies = await self._llm.collective_rpc("persona_take")
        now = time.monotonic()
        for uid, result in (replies[0] or {}).items():
            held = self._results.get(uid)
            if held is None:
                self._results[uid] = (now, result)
            else:
                old = held[1]
                old.setdefault("tokens", []).extend(result.get("tokens", ()))
                if "prefill" in result:
                    old["prefill"] = result["prefill"]
        # Results of requests that left before reading them.
        for uid in [u for u, (t, _r) in self._results.items() if now - t > 300]:
            del self._results[uid]
        if not replies[0]:
            await asyncio.sleep(0.002)


def _salt(steer: list, prompt_len: int, remedy: list = ()) -> str:
    """The prefix-cache salt of a steered request (``steer`` and ``remedy`` as
    :func:`encode_request` packs them).

    A cached block holds keys computed under the delta of each of its positions' phase. When the
    phases differ, a follow-up turn that resends an earlier answer as its prompt would find the
    answer's blocks, computed under the response's delta, where its prompt's delta belongs; the
    prompt's length in the salt keeps the two layouts apart (vLLM salts the whole block chain).
    A remediation may steer the response and never the prompt, so it always splits the phases.
    """
    digest = hashlib.sha256()
    for layer, phase, blob in sorted(steer, key=lambda e: (e[0], e[1])):
        digest.update(f"{layer}:{phase}:".encode())
        digest.update(blob)
    phases = {PROMPT: {}, RESPONSE: {}}
    for layer, phase, blob in steer:
        phases[phase][layer] = blob
    for name, layer, index, limit, deltas in remedy:
        digest.update(f"remedy:{name}:{layer}:{index}:{limit!r}:".encode())
        for at, blob in sorted(deltas, key=lambda e: e[0]):
            digest.update(f"{at}:".encode())
            digest.update(blob)
    if phases[PROMPT] != phases[RESPONSE] or remedy:
        digest.update(f"prompt:{prompt_len}".encode())
    return digest.hexdigest()[:32]


def _same_adapter(a: Adapter, b: Adapter) -> bool:
    """Whether two parsed adapters apply the same deltas (the same groups, equal tensors)."""
    if a.parts.keys() != b.parts.keys():
        return False
    return all(len(x.tensors()) == len(y.tensors()) and all(map(torch.equal, x.tensors(), y.tensors()))
               and x.scales == y.scales for x, y in ((a.parts[k], b.parts[k]) for k in a.parts))


def _vllm_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that is at least ``rank``."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    return next((r for r in allowed if r >= rank), allowed[-1])


def _vllm_seed(seed: int | None) -> int | None:
    """vLLM seeds are signed 64-bit; ours range over -2^63..2^64-1: fold them into its range."""
    if seed is None:
        return None
    return ((seed + 2**63) % 2**64) - 2**63


def _queue_wait(out, submitted: float) -> float:
    metrics = getattr(out, "metrics", None)
    queued = getattr(metrics, "queued_ts", None) if metrics else None
    scheduled = getattr(metrics, "scheduled_ts", None) if metrics else None
    if queued and scheduled and scheduled >= queued:
        return float(scheduled - queued)
    return max(0.0, time.monotonic() - submitted)
