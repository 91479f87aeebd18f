"""Prometheus metrics, on a registry of the app's own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter(
            "nsfaas_invocations",
            "Finished invocations",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "nsfaas_invocation_duration_seconds",
            "Wall time of invocations",
            ["function"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.starts = Counter(
            "nsfaas_starts", "Invocation starts by kind", ["kind"], registry=self.registry
        )
        self.in_flight = Gauge(
            "nsfaas_in_flight", "Invocations running now", registry=self.registry
        )
        self.queued = Gauge(
            "nsfaas_queue_length", "Invocations waiting for a slot", registry=self.registry
        )
        self.log_lines_dropped = Counter(
            "nsfaas_log_lines_dropped",
            "Function log lines dropped by caps",
            registry=self.registry,
        )
        self.warm_workers = Gauge(
            "nsfaas_warm_workers", "Warm workers alive", registry=self.registry
        )
        self.worker_crashes = Counter(
            "nsfaas_worker_replacements",
            "Warm workers that died and were replaced",
            registry=self.registry,
        )
        self._replacements_seen = 0

    def sync_pool(self, replaced: int) -> None:
        """Carry the pool's own replacement count into the counter."""
        if replaced > self._replacements_seen:
            self.worker_crashes.inc(replaced - self._replacements_seen)
            self._replacements_seen = replaced
