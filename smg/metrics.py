"""Prometheus metrics with the reference gateway's names (SPEC.md §7).

The data plane keeps plain counters on its own objects (routes, workers,
the proxy settings); this collector reads them only when /metrics is
scraped, so recording costs the hot path a few integer increments. The
metrics listener runs on the gateway's event loop: no thread ever reads
state that the loop is changing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from smg._fast.server import BUCKETS, Response
from smg._fast.worker import DRAINING, READY, TYPE_NAMES, Worker

if TYPE_CHECKING:
    from smg.gateway import Gateway

_BUCKET_LABELS = [f"{b:g}" for b in BUCKETS] + ["+Inf"]


class GatewayCollector:
    def __init__(self, gw: Gateway):
        self.gw = gw

    def collect(self) -> Iterator[Metric]:
        gw = self.gw
        yield from self._http(gw)
        yield from self._workers(gw)
        for source in gw.metric_sources:
            yield from source()

    def _http(self, gw: Gateway) -> Iterator[Metric]:
        requests = CounterMetricFamily("smg_http_requests", "Total HTTP requests by method and path",
                                       labels=["method", "path"])
        responses = CounterMetricFamily(
            "smg_http_responses", "Total HTTP responses by path, status_code and error_code",
            labels=["path", "status_code", "error_code"])
        durations = HistogramMetricFamily("smg_http_request_duration_seconds",
                                          "HTTP request duration by method and path", labels=["method", "path"])
        for route in gw.core.all_routes():
            for method, n in route.requests.items():
                requests.add_metric([method.decode("latin-1"), route.path], n)
            for (status, code), n in route.responses.items():
                responses.add_metric([route.path, str(status), code or ""], n)
            for method, hist in route.durations.items():
                counts, total, _ = hist.snapshot()
                durations.add_metric([method.decode("latin-1"), route.path],
                                     list(zip(_BUCKET_LABELS, counts)), total)
        yield requests
        yield responses
        yield durations
        yield GaugeMetricFamily("smg_http_connections_active", "Currently active HTTP connections",
                                value=len(gw.core.connections))
        adm = gw.core.admission
        yield GaugeMetricFamily("smg_admission_inflight", "Proxied requests holding an admission slot",
                                value=adm.active)
        yield GaugeMetricFamily("smg_admission_queue_depth", "Requests waiting for an admission slot",
                                value=adm.queue_depth)
        rejected = CounterMetricFamily("smg_admission_rejected", "Requests refused with 429 by admission control",
                                       labels=["reason"])
        rejected.add_metric(["queue_full"], adm.rejected_full)
        rejected.add_metric(["queue_timeout"], adm.rejected_timeout)
        yield rejected

    def _workers(self, gw: Gateway) -> Iterator[Metric]:
        # series are labelled by URL: a draining worker and its successor at
        # the same address (a re-created pod) must not both report
        by_url: dict[str, Worker] = {}
        for w in gw.registry.all():
            if w.url not in by_url or by_url[w.url].state == DRAINING:
                by_url[w.url] = w
        workers = list(by_url.values())
        req_total = CounterMetricFamily("smg_worker_requests", "Requests dispatched to a worker by worker (URL) and model",
                                        labels=["worker", "model"])
        active = GaugeMetricFamily("smg_worker_requests_active", "Currently running requests per worker",
                                   labels=["worker"])
        health = GaugeMetricFamily("smg_worker_health", "Worker health status (1=healthy, 0=unhealthy)",
                                   labels=["worker"])
        cb_state = GaugeMetricFamily("smg_worker_cb_state",
                                     "Circuit breaker state per worker (0=closed, 1=open, 2=half_open)",
                                     labels=["worker"])
        cb_fail = GaugeMetricFamily("smg_worker_cb_consecutive_failures",
                                    "Consecutive failures counted by the circuit breaker", labels=["worker"])
        cb_succ = GaugeMetricFamily("smg_worker_cb_consecutive_successes",
                                    "Consecutive successes counted by the circuit breaker", labels=["worker"])
        cb_outcomes = CounterMetricFamily("smg_worker_cb_outcomes", "Circuit breaker outcomes by worker",
                                          labels=["worker", "outcome"])
        pool_size: dict[tuple[str, str], int] = {}
        for w in workers:
            req_total.add_metric([w.url, w.model_id], w.requests_total)
            active.add_metric([w.url], w.inflight)
            health.add_metric([w.url], 1 if w.state == READY else 0)
            cb_state.add_metric([w.url], w.cb_state)
            cb_fail.add_metric([w.url], w.cb_failures)
            cb_succ.add_metric([w.url], w.cb_successes)
            cb_outcomes.add_metric([w.url, "success"], w.cb_outcome_success)
            cb_outcomes.add_metric([w.url, "failure"], w.cb_outcome_failure)
            key = (TYPE_NAMES[w.worker_type], w.model_id)
            pool_size[key] = pool_size.get(key, 0) + 1
        yield req_total
        yield active
        yield health
        yield cb_state
        yield cb_fail
        yield cb_succ
        yield cb_outcomes
        transitions = CounterMetricFamily("smg_worker_cb_transitions",
                                          "Circuit breaker state transitions by worker, from, to",
                                          labels=["worker", "from", "to"])
        for (url, old, new), n in gw.registry.cb_transitions.items():
            transitions.add_metric([url, old, new], n)
        yield transitions
        pool = GaugeMetricFamily("smg_worker_pool_size", "Current worker pool size by worker_type, connection_mode, model",
                                 labels=["worker_type", "connection_mode", "model"])
        for (wtype, model), n in pool_size.items():
            pool.add_metric([wtype, "http", model], n)
        yield pool
        checks = CounterMetricFamily("smg_worker_health_checks", "Health check results by worker_type and result",
                                     labels=["worker_type", "result"])
        for (wtype, result), n in gw.health.results.items():
            checks.add_metric([wtype, result], n)
        yield checks
        retries = CounterMetricFamily("smg_worker_retries", "Total retry attempts by worker_type and endpoint",
                                      labels=["worker_type", "endpoint"])
        for (wtype, endpoint), n in gw.proxy_settings.retries.items():
            retries.add_metric([wtype, endpoint], n)
        yield retries
        exhausted = CounterMetricFamily("smg_worker_retries_exhausted",
                                        "Requests that failed after their last attempt, by worker_type and endpoint",
                                        labels=["worker_type", "endpoint"])
        for (wtype, endpoint), n in gw.proxy_settings.retries_exhausted.items():
            exhausted.add_metric([wtype, endpoint], n)
        yield exhausted
        yield from self._cache_aware(gw)

    def _cache_aware(self, gw: Gateway) -> Iterator[Metric]:
        from smg._fast.policies import CacheAwarePolicy

        tree = GaugeMetricFamily("smg_cache_aware_tree_chars",
                                 "Characters in a model's cache-aware routing tree", labels=["model", "worker_type"])
        share = GaugeMetricFamily("smg_cache_aware_worker_tree_chars",
                                  "Characters of the routing tree a worker holds", labels=["model", "worker"])
        decisions = CounterMetricFamily("smg_cache_aware_decisions",
                                        "cache_aware routing decisions: hit (prefix owner), miss (least loaded), "
                                        "spill (owner overloaded), handover (prefix moved off an overloaded worker)",
                                        labels=["model", "worker_type", "decision"])
        for (wtype, model), group in list(gw.router.groups.items()):
            policy = group.policy
            if not isinstance(policy, CacheAwarePolicy):
                continue
            tname = TYPE_NAMES[wtype]
            tree.add_metric([model, tname], policy.tree.total_chars)
            for w in group.workers:
                slot = policy.slot_of(w)
                if slot is not None:
                    share.add_metric([model, w.url], policy.tree.chars_of(slot))
            for attr, decision in (("hits", "hit"), ("misses", "miss"), ("spills", "spill"),
                                   ("handovers", "handover")):
                decisions.add_metric([model, tname, decision], getattr(policy, attr))
        yield tree
        yield share
        yield decisions


class MetricsEndpoint:
    def __init__(self, gw: Gateway):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(GatewayCollector(gw))  # type: ignore[arg-type]

    def extend(self, collector) -> None:
        self.registry.register(collector)

    def handle(self, req) -> Response:
        return Response(200, generate_latest(self.registry), b"text/plain; version=0.0.4; charset=utf-8")
