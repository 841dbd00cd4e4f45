"""Prometheus metrics. Prefix ``persona_``, base units, labels only from configuration
(endpoint route templates, vector names in the registry, loaded adapter names), never from
request content.

Per-request series (tokens, latencies, monitor readings and verdicts) carry an ``adapter`` label:
the name of the LoRA adapter the request ran with, or ``""`` for the base model (an adapter name
cannot be empty, and PromQL's ``{adapter=""}`` also selects series without the label). The label
takes only the names of loaded adapters, at most ``PERSONA_MAX_LORAS`` at a time: unloading one
removes its series, and what its last in-flight requests would still record is dropped, so an
unloaded name never comes back.

Monitor thresholds live on a registry of their own (:attr:`Metrics.ops_registry`), served only
to scrapes that hold an admin or metrics key: a client that knows a block threshold can tune a
prompt to sit just under it."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

BASE = ""  # the adapter label of requests served by the base model

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
# A fixed z ladder, so score histograms of all vectors (and of all servers) aggregate.
Z_LADDER = (-4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """All metrics of one server, on a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ops_registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "persona_requests", "HTTP requests answered, by route and status code.", ["endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "persona_request_duration_seconds", "Time from request to the last byte of the response.",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "persona_time_to_first_token_seconds", "Time from request to the first generated token.",
            ["endpoint", "adapter"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "persona_inter_token_latency_seconds", "Mean time between generated tokens, per request.",
            ["endpoint", "adapter"], buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "persona_queue_wait_seconds", "Time a request waited before its prefill.",
            ["adapter"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("persona_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter("persona_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.steering = Counter(
            "persona_steering_requests", "Generation requests steered by each vector.", ["vector"], registry=r
        )
        # Labelled by adapter name: names come from admins' loads, at most PERSONA_MAX_LORAS at a time.
        self.adapter_requests = Counter(
            "persona_adapter_requests", "Generation requests served with a LoRA adapter, by adapter.", ["adapter"],
            registry=r,
        )
        self.running = Gauge("persona_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("persona_requests_waiting", "Requests queued for prefill.", registry=r)
        self.queue_capacity = Gauge("persona_queue_capacity", "Configured queue length (PERSONA_MAX_WAITING).", registry=r)
        self.batch_capacity = Gauge("persona_batch_capacity", "Configured running batch size (PERSONA_MAX_BATCH_SIZE).", registry=r)
        self.model_info = Info("persona_model", "The loaded model.", registry=r)
        self.monitor_score = Histogram(
            "persona_monitor_score", "Monitor z-score of the last prompt token, per vector (fixed z ladder).",
            ["vector", "adapter"], buckets=Z_LADDER, registry=r,
        )
        # A histogram with negative buckets exposes no _sum, and a plain running sum of scores
        # falls whenever a score is negative, which rate() reads as a counter reset. Two counters
        # that only rise carry the sum instead: mean = (positive - negative) / persona_monitor_score_count.
        self.monitor_zscore_positive = Counter(
            "persona_monitor_zscore_positive", "Sum of the positive monitor z-scores, per vector.", ["vector", "adapter"],
            registry=r,
        )
        self.monitor_zscore_negative = Counter(
            "persona_monitor_zscore_negative", "Sum of the magnitudes of the negative monitor z-scores, per vector.",
            ["vector", "adapter"], registry=r,
        )
        self.monitor_decisions = Counter(
            "persona_monitor_decisions", "Monitor verdicts by vector, action (allow, flag, remediate, block) "
            "and mode (enforce, annotate); mode=annotate counts would-be remediations and blocks.",
            ["vector", "action", "mode", "adapter"], registry=r,
        )
        self.monitor_threshold = Gauge(
            "persona_monitor_threshold", "Current monitor thresholds, by vector and level (flag, block, response).",
            ["vector", "level"], registry=self.ops_registry,
        )
        self.response_stops = Counter(
            "persona_monitor_response_stops", "Generations stopped by a response-phase monitor.", ["vector", "adapter"],
            registry=r,
        )
        self._by_adapter = (self.ttft, self.inter_token, self.queue_wait, self.prompt_tokens, self.generation_tokens,
                            self.monitor_score, self.monitor_zscore_positive, self.monitor_zscore_negative,
                            self.monitor_decisions, self.response_stops, self.adapter_requests)
        self._adapters: frozenset[str] = frozenset()
        # Held while a series of an adapter is written or removed, so an unload never races a
        # late observation into bringing the unloaded name's series back.
        self._adapter_lock = threading.Lock()
        self.prompt_tokens.labels(adapter=BASE)
        self.generation_tokens.labels(adapter=BASE)

    def set_thresholds(self, configs: dict) -> None:
        """Mirror the monitor configuration into the threshold gauge."""
        self.monitor_threshold.clear()
        for name, cfg in configs.items():
            # Create the monitor's series at zero, so dashboards and rate() see them from the start.
            self.monitor_score.labels(name, BASE)
            self.monitor_zscore_positive.labels(name, BASE)
            self.monitor_zscore_negative.labels(name, BASE)
            self.response_stops.labels(name, BASE)
            for level, value in (("flag", cfg.flag_threshold), ("block", cfg.block_threshold), ("response", cfg.response_threshold)):
                if value is not None and cfg.mode != "off":
                    self.monitor_threshold.labels(name, level).set(value)

    def set_adapters(self, names: Iterable[str]) -> None:
        """The adapters loaded now: the only names the ``adapter`` label takes. Series of names no
        longer loaded are removed; those of new names start at zero, so ``rate()`` sees them.

        Example::

            store.on_change(metrics.set_adapters)   # every load, unload and replica reload
        """
        names = frozenset(names)
        with self._adapter_lock:
            for gone in self._adapters - names:
                for metric in self._by_adapter:
                    metric.remove_by_labels({"adapter": gone})
            for new in names - self._adapters:
                for metric in (self.prompt_tokens, self.generation_tokens, self.adapter_requests):
                    metric.labels(adapter=new)
            self._adapters = names

    def _live(self, adapter: str) -> bool:
        return adapter == BASE or adapter in self._adapters

    def count_request(self, adapter: str) -> None:
        """One generation request accepted for ``adapter`` (base requests are not counted here)."""
        with self._adapter_lock:
            if adapter != BASE and self._live(adapter):
                self.adapter_requests.labels(adapter=adapter).inc()

    def count_tokens(self, adapter: str, prompt: int, generated: int) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.prompt_tokens.labels(adapter=adapter).inc(prompt)
                self.generation_tokens.labels(adapter=adapter).inc(generated)

    def observe_queue_wait(self, adapter: str, seconds: float) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.queue_wait.labels(adapter=adapter).observe(seconds)

    def observe_ttft(self, endpoint: str, adapter: str, seconds: float) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.ttft.labels(endpoint, adapter).observe(seconds)

    def observe_inter_token(self, endpoint: str, adapter: str, seconds: float) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.inter_token.labels(endpoint, adapter).observe(seconds)

    def observe_score(self, vector: str, value: float, adapter: str = BASE) -> None:
        """Record one monitor score: the ladder histogram and the two sums of the mean.

        Example::

            metrics.observe_score("evil", -0.7)   # negative sum += 0.7, count += 1
        """
        with self._adapter_lock:
            if not self._live(adapter):
                return
            self.monitor_score.labels(vector, adapter).observe(value)
            if value > 0:
                self.monitor_zscore_positive.labels(vector, adapter).inc(value)
            elif value < 0:
                self.monitor_zscore_negative.labels(vector, adapter).inc(-value)

    def count_decision(self, vector: str, action: str, mode: str, adapter: str = BASE) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.monitor_decisions.labels(vector, action, mode, adapter).inc()

    def count_response_stop(self, vector: str, adapter: str = BASE) -> None:
        with self._adapter_lock:
            if self._live(adapter):
                self.response_stops.labels(vector, adapter).inc()

    def bind_engine(self, engine) -> None:
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)
        self.queue_capacity.set(engine.max_waiting)
        self.batch_capacity.set(engine.max_batch_size)
