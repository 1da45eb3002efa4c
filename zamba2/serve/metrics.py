"""Prometheus metrics of one server, in its own registry (several servers may live in one process).

HTTP-side numbers (requests, tokens of finished requests, time to first token) are observed by the request
handlers; engine-side ones (queue depth, active sequences, decode rate, prompt-cache hits) are read from the
engine when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from zamba2.serve.engine import Engine

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine()
        stats = e.stats if e is not None else None
        pc = e.prompt_cache if e is not None else None

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        h = e.health() if e is not None else {"outstanding": 0, "untracked": 0, "stalled_s": 0.0}
        yield gauge("zamba2_queue_depth", "Requests waiting for a slot", e.queue_depth if e else 0)
        yield gauge("zamba2_outstanding_requests", "Requests submitted and not finished (queued + active)",
                    h["outstanding"])  # fmt: skip
        yield gauge("zamba2_untracked_requests", "Outstanding requests in no engine list: leaked slots (0 normally)",
                    h["untracked"])  # fmt: skip
        yield gauge("zamba2_engine_stalled_seconds", "How long the engine has gone without progress with work "
                    "outstanding", h["stalled_s"])  # fmt: skip
        yield counter("zamba2_failed_requests", "Requests ended by an error", stats.failed if stats else 0)
        yield gauge("zamba2_active_sequences", "Sequences being prefilled or decoded", e.active if e else 0)
        yield gauge("zamba2_decode_tokens_per_second", "Aggregate decode rate over the latest steps",
                    stats.decode_tokens_per_s if stats else 0.0)  # fmt: skip
        yield counter("zamba2_prefill_tokens", "Prompt tokens run through the model (cache hits excluded)",
                      stats.prompt_tokens if stats else 0)  # fmt: skip
        yield counter("zamba2_decode_steps", "Batched decode steps", stats.decode_steps if stats else 0)
        yield counter("zamba2_cancelled_requests", "Requests cancelled (client gone)", stats.cancelled if stats else 0)
        yield counter("zamba2_rejected_requests", "Requests refused with 429", stats.rejected if stats else 0)
        yield counter("zamba2_prompt_cache_hits", "Prompts resumed from a saved state", pc.hits if pc else 0)
        yield counter("zamba2_prompt_cache_misses", "Prompts with no saved prefix state", pc.misses if pc else 0)
        yield counter("zamba2_prompt_cache_hit_tokens", "Prompt tokens served from saved states",
                      pc.hit_tokens if pc else 0)  # fmt: skip
        yield gauge("zamba2_prompt_cache_bytes", "Bytes held by saved prompt states", pc.bytes if pc else 0)
        sp = e.speculation_stats if e is not None else None
        yield counter("zamba2_speculative_proposed_tokens", "Draft tokens checked by speculative verifications",
                      sp.proposed if sp else 0)  # fmt: skip
        yield counter("zamba2_speculative_accepted_tokens", "Draft tokens the model accepted",
                      sp.accepted if sp else 0)  # fmt: skip
        yield counter("zamba2_speculative_verifications", "Multi-token verification passes of a lone stream",
                      sp.verifications if sp else 0)  # fmt: skip
        yield counter("zamba2_speculative_plain_steps", "One-token steps of a lone stream (nothing proposed or "
                      "backing off)", sp.plain_steps if sp else 0)  # fmt: skip
        yield gauge("zamba2_speculative_acceptance_rate", "Accepted / proposed draft tokens since start",
                    sp.acceptance_rate if sp else 0.0)  # fmt: skip


class ServerMetrics:
    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        disable_created_metrics()  # no `*_created` series next to every counter (a process-wide switch)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zamba2_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.prompt_tokens = Counter("zamba2_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("zamba2_generation_tokens", "Tokens generated for finished requests",
                                         registry=r)  # fmt: skip
        self.ttft = Histogram("zamba2_time_to_first_token_seconds", "From request received to first token",
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
