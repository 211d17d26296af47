"""`GET /metrics`: the server's counters and the engine's state in Prometheus' text format (prometheus-client)."""

from __future__ import annotations

from ..utils import log


class Metrics:
    """Request counters and latency histograms of one app, and the engine's own statistics read at scrape time."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.engine = engine
        self.registry = CollectorRegistry()
        self.requests = Counter("layerstream_requests", "HTTP completion requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("layerstream_prompt_tokens", "prompt tokens of finished requests",
                                     registry=self.registry)
        self.completion_tokens = Counter("layerstream_completion_tokens", "tokens generated for finished requests",
                                         registry=self.registry)
        self.latency = Histogram("layerstream_request_seconds", "time from request to its last token",
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=self.registry)
        self.ttft = Histogram("layerstream_time_to_first_token_seconds", "time from request to its first token",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def request(self, route: str, status: int) -> None:
        """A request answered with an error (or 499: the client went away), counted and logged."""
        self.requests.labels(route, str(status)).inc()
        if status != 200:
            log(f"{route} {status}" + (" (the client went away)" if status == 499 else ""))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def finished(self, route: str, cs, seconds: float) -> None:
        """A request answered in full (its Completion, or one per choice): counted, timed, and logged in one line
        (its id, tokens in and out, time)."""
        cs = cs if isinstance(cs, list) else [cs]
        c, out = cs[0], sum(x.completion_tokens for x in cs)
        self.request(route, 200)
        log(f"{route} {c.request_id} 200: {c.prompt_tokens} prompt + {out} completion tokens in "
            f"{seconds:.2f} s ({', '.join(x.finish_reason for x in cs)})")
        self.prompt_tokens.inc(c.prompt_tokens)
        self.completion_tokens.inc(out)
        self.latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's statistics (steps, tokens, bytes read, queue) as they are at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        now = self.engine.snapshot()   # taken under the engine's lock
        s = now.stats
        yield GaugeMetricFamily("layerstream_queue_waiting", "requests waiting for a slot", value=now.waiting)
        yield GaugeMetricFamily("layerstream_running", "sequences in the running batch", value=now.running)
        yield CounterMetricFamily("layerstream_sweeps", "forward sweeps over the model", value=s["steps"])
        yield CounterMetricFamily("layerstream_generated_tokens", "tokens sampled by the engine", value=s["tokens"])
        yield CounterMetricFamily("layerstream_prefill_tokens", "prompt tokens computed (prefix-cache hits excluded)",
                                  value=s["prefill_tokens"])
        yield CounterMetricFamily("layerstream_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                  value=s.get("prefix_hit_tokens", 0))
        yield CounterMetricFamily("layerstream_draft_tokens", "tokens proposed by the draft model (speculative)",
                                  value=s.get("drafted", 0))
        yield CounterMetricFamily("layerstream_draft_accepted_tokens", "drafted tokens the model accepted",
                                  value=s.get("accepted", 0))
        yield CounterMetricFamily("layerstream_bytes_read", "weight bytes read from the store", value=s["bytes_read"])
        yield GaugeMetricFamily("layerstream_tokens_per_second", "tokens generated per second of engine time",
                                value=s["tokens"] / s["seconds"] if s["seconds"] else 0.0)
        yield GaugeMetricFamily("layerstream_bytes_read_per_token", "weight bytes read per generated token",
                                value=s["bytes_read"] / s["tokens"] if s["tokens"] else 0.0)
        yield GaugeMetricFamily("layerstream_kv_cache_tokens", "tokens in the KV cache (prefix cache included)",
                                value=now.kv_tokens)
