"""Prometheus metrics. Prefix ``persona_``, base units, labels only from configuration
(endpoint route templates, vector names in the registry), never from request content."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """All metrics of one server, on a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.inter_token = Histogram(
            "persona_inter_token_latency_seconds", "Mean time between generated tokens, per request.",
            ["endpoint"], buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "persona_queue_wait_seconds", "Time a request waited before its prefill.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("persona_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("persona_generation_tokens", "Tokens generated.", registry=r)
        self.steering = Counter(
            "persona_steering_requests", "Generation requests steered by each vector.", ["vector"], registry=r
        )
        self.running = Gauge("persona_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("persona_requests_waiting", "Requests queued for prefill.", registry=r)
        self.model_info = Info("persona_model", "The loaded model.", registry=r)

    def bind_engine(self, engine) -> None:
        self.running.set_function(lambda: engine.running)
        self.waiting.set_function(lambda: engine.waiting)
