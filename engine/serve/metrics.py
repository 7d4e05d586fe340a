"""Prometheus metrics of the endpoint: latencies and token counters observed at the ingress, engine gauges
(running, waiting, KV-cache usage, prefix-cache hit rate, speculative drafts kept) summed over engine replicas
by the metrics hub."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_TPOT = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServeMetrics:
    def __init__(self, model: str):
        self.registry = r = CollectorRegistry()
        lab = ["model"]
        self.model = model
        self.running = Gauge("raylm_requests_running", "Requests in engine batches", lab, registry=r)
        self.waiting = Gauge("raylm_requests_waiting", "Requests queued in engines", lab, registry=r)
        self.kv_usage = Gauge("raylm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", lab, registry=r)
        self.kv_used = Gauge("raylm_kv_cache_used_blocks", "KV-cache blocks in use", lab, registry=r)
        self.prefix_hit = Gauge("raylm_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / looked up",
                                lab, registry=r)
        self.drafts = Gauge("raylm_spec_decode_draft_tokens", "Speculative draft tokens proposed, summed over "
                            "the live replicas since they started", lab, registry=r)
        self.accepted = Gauge("raylm_spec_decode_accepted_tokens", "Of those, the draft tokens kept", lab, registry=r)
        self.acceptance = Gauge("raylm_spec_decode_acceptance_rate", "Draft tokens kept / proposed", lab, registry=r)
        self.replicas = Gauge("raylm_engine_replicas", "Engine replicas reporting", lab, registry=r)
        self.ttft = Histogram("raylm_time_to_first_token_seconds", "Time to first token", lab, buckets=_LAT, registry=r)
        self.tpot = Histogram("raylm_time_per_output_token_seconds", "Time per output token after the first", lab,
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("raylm_e2e_request_latency_seconds", "End-to-end request latency", lab,
                             buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("raylm_prompt_tokens", "Prompt tokens processed", lab, registry=r)
        self.generation_tokens = Counter("raylm_generation_tokens", "Tokens generated", lab, registry=r)
        self.finished = Counter("raylm_requests_finished", "Finished requests by finish reason",
                                lab + ["finish_reason"], registry=r)
        self.errors = Counter("raylm_request_errors", "Refused or failed requests by HTTP status",
                              lab + ["status"], registry=r)

    def observe_request(self, t_first: float, t_end: float, prompt: int, completion: int, reasons) -> None:
        m = self.model
        self.ttft.labels(m).observe(t_first)
        self.e2e.labels(m).observe(t_end)
        if completion > 1:
            self.tpot.labels(m).observe((t_end - t_first) / (completion - 1))
        self.prompt_tokens.labels(m).inc(prompt)
        self.generation_tokens.labels(m).inc(completion)
        for r in reasons:
            self.finished.labels(m, r or "unknown").inc()

    def error(self, status: int) -> None:
        self.errors.labels(self.model, str(status)).inc()

    def render(self, snapshot: dict) -> bytes:
        m = self.model
        self.running.labels(m).set(snapshot.get("running", 0))
        self.waiting.labels(m).set(snapshot.get("waiting", 0))
        self.kv_usage.labels(m).set(snapshot.get("kv_usage", 0.0))
        self.kv_used.labels(m).set(snapshot.get("used_blocks", 0))
        self.prefix_hit.labels(m).set(snapshot.get("prefix_hit_rate", 0.0))
        self.replicas.labels(m).set(snapshot.get("replicas", 0))
        self.drafts.labels(m).set(snapshot.get("draft_tokens", 0))
        self.accepted.labels(m).set(snapshot.get("accepted_draft_tokens", 0))
        self.acceptance.labels(m).set(snapshot.get("draft_acceptance_rate", 0.0))
        return generate_latest(self.registry)
