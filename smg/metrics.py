"""Prometheus metrics with the reference gateway's names.

The data plane keeps plain counters on its own objects (routes, workers,
the proxy settings, the cache-aware policies). `dataplane_snapshot` copies
them into plain data when /metrics is scraped, so recording costs the hot
path a few integer increments. With --workers N the control plane asks
every data-plane process for its snapshot and adds them up
(`merge_snapshots`), so /metrics shows the host, not one process. The
collector renders a snapshot together with what the control plane owns
(the worker set, health checks, discovery)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Optional, Union

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from smg._fast.routes import Response, buckets
from smg._fast.worker import CB_SEVERITY, DRAINING, READY, TYPE_NAMES, Worker

if TYPE_CHECKING:
    from smg.gateway import DataPlane
    from smg.health import HealthChecker
    from smg.workers import Registry

def bucket_labels() -> list[str]:
    """The `le` labels of the duration histograms (--prometheus-duration-buckets)."""
    return [f"{b:g}" for b in buckets()] + ["+Inf"]


def dataplane_snapshot(dp: DataPlane) -> dict:
    """Every counter of one data plane, as plain (JSON-able) data."""
    from smg._fast.policies import CacheAwarePolicy

    routes = {}
    for route in dp.core.all_routes():
        routes[route.path] = {
            "requests": {m.decode("latin-1"): n for m, n in route.requests.items()},
            "responses": [[status, code or "", n] for (status, code), n in route.response_counts().items()],
            "durations": {m.decode("latin-1"): list(h.snapshot()[:2]) for m, h in route.durations.items()},
        }
    workers = {}
    for w in dp.registry.all():
        pool = w.pool
        workers[w.id] = {"requests": w.requests_total, "inflight": w.inflight, "cb_state": w.cb_state,
                         "cb_failures": w.cb_failures, "cb_successes": w.cb_successes,
                         "cb_ok": w.cb_outcome_success, "cb_fail": w.cb_outcome_failure,
                         "connections": pool.open_count, "waiting": pool.waiting,
                         "connect_timeouts": pool.connect_timeouts_total,
                         "prefill_queue_chars": w.prefill_queue_chars, "unanswered": w.unanswered}
    cache_aware = []
    kv_events = []
    for (wtype, model), group in list(dp.router.groups.items()):
        policy = group.policy
        if not isinstance(policy, CacheAwarePolicy):
            continue
        shares = {}
        for w in group.workers:
            slot = policy.slot_of(w)
            if slot is not None:
                shares[w.url] = policy.tree.chars_of(slot)
        cache_aware.append([TYPE_NAMES[wtype], model, policy.tree.total_chars, shares,
                            {"hit": policy.hits, "miss": policy.misses, "spill": policy.spills,
                             "move": policy.moves, "routed_chars": policy.routed_chars,
                             "expected_cached_chars": policy.expected_cached_chars},
                            [[change, reason, n] for (change, reason), n in policy.placement_changes.items()]])
        if policy.kv is not None:
            kv_events.append([TYPE_NAMES[wtype], model, policy.kv.snapshot(), policy.kv.tokenized,
                              policy.kv.tokenize_secs, policy.kv.tokenizer.reused])
    adm = dp.call_settings.admission
    settings = dp.call_settings
    return {
        "routes": routes,
        "requests": sum(sum(r["requests"].values()) for r in routes.values()),
        "connections": len(dp.core.connections),
        "connections_shed": dp.core.shed_total,
        "admission": {"active": adm.active, "queue_depth": adm.queue_depth,
                      "rejected_full": adm.rejected_full, "rejected_timeout": adm.rejected_timeout},
        "workers": workers,
        "cb_transitions": [[url, old, new, n] for (url, old, new), n in dp.registry.cb_transitions.items()],
        "retries": [[t, e, n] for (t, e), n in settings.retries.items()],
        "retries_exhausted": [[t, e, n] for (t, e), n in settings.retries_exhausted.items()],
        "router_requests": settings.routed_counts(),
        "router_errors": [[*key, n] for key, n in settings.errors.items()],
        "router_upstream": [[*key, n] for key, n in settings.upstream_counts().items()],
        "router_durations": [[*key, *s.durations.snapshot()[:2]] for key, s in settings.series.items()
                             if s.durations.count],
        "cache_aware": cache_aware,
        "kv_events": kv_events,
    }


def merge_snapshots(snapshots: list[dict]) -> dict:
    """The host's view: counters and in-flight gauges add up; a breaker
    shows its most restrictive state; a cache-aware tree its largest size
    (every process builds the same tree from its share of the traffic)."""
    routes: dict[str, dict] = {}
    workers: dict[str, dict] = {}
    cache_aware: dict[tuple, list] = {}
    keyed: dict[str, dict[tuple, int]] = {"cb_transitions": {}, "retries": {}, "retries_exhausted": {},
                                          "router_requests": {}, "router_errors": {}, "router_upstream": {}}
    router_durations: dict[tuple, list] = {}
    out = {"requests": 0, "connections": 0, "connections_shed": 0,
           "admission": {"active": 0, "queue_depth": 0, "rejected_full": 0, "rejected_timeout": 0}}
    for snap in snapshots:
        out["requests"] += snap["requests"]
        out["connections"] += snap["connections"]
        out["connections_shed"] += snap["connections_shed"]
        for k, v in snap["admission"].items():
            out["admission"][k] += v
        for path, r in snap["routes"].items():
            into = routes.setdefault(path, {"requests": {}, "responses": {}, "durations": {}})
            for m, n in r["requests"].items():
                into["requests"][m] = into["requests"].get(m, 0) + n
            for status, code, n in r["responses"]:
                into["responses"][(status, code)] = into["responses"].get((status, code), 0) + n
            for m, (counts, total) in r["durations"].items():
                have = into["durations"].get(m)
                into["durations"][m] = [list(counts), total] if have is None else \
                    [[a + b for a, b in zip(have[0], counts)], have[1] + total]
        for wid, w in snap["workers"].items():
            have = workers.get(wid)
            if have is None:
                workers[wid] = dict(w)
                continue
            for k in ("requests", "inflight", "cb_failures", "cb_successes", "cb_ok", "cb_fail", "connections",
                      "waiting", "connect_timeouts", "prefill_queue_chars", "unanswered"):
                have[k] += w[k]
            if CB_SEVERITY[w["cb_state"]] > CB_SEVERITY[have["cb_state"]]:
                have["cb_state"] = w["cb_state"]
        for name, rows in keyed.items():
            for *key, n in snap[name]:
                rows[tuple(key)] = rows.get(tuple(key), 0) + n
        for backend, model, endpoint, counts, total in snap["router_durations"]:
            have = router_durations.get((backend, model, endpoint))
            router_durations[(backend, model, endpoint)] = [list(counts), total] if have is None else \
                [[a + b for a, b in zip(have[0], counts)], have[1] + total]
        for tname, model, total, shares, decisions, changes in snap["cache_aware"]:
            have = cache_aware.get((tname, model))
            if have is None:
                cache_aware[(tname, model)] = [tname, model, total, dict(shares), dict(decisions),
                                               [list(row) for row in changes]]
                continue
            have[2] = max(have[2], total)
            for url, chars in shares.items():
                have[3][url] = max(have[3].get(url, 0), chars)
            for k, n in decisions.items():
                have[4][k] = have[4].get(k, 0) + n
            sums = {(c, r): n for c, r, n in have[5]}
            for change, reason, n in changes:
                sums[change, reason] = sums.get((change, reason), 0) + n
            have[5] = [[c, r, n] for (c, r), n in sums.items()]
    out["routes"] = {path: {"requests": r["requests"],
                            "responses": [[s, c, n] for (s, c), n in r["responses"].items()],
                            "durations": r["durations"]} for path, r in routes.items()}
    out["workers"] = workers
    for name, rows in keyed.items():
        out[name] = [[*key, n] for key, n in rows.items()]
    out["router_durations"] = [[*key, counts, total] for key, (counts, total) in router_durations.items()]
    out["cache_aware"] = list(cache_aware.values())
    out["kv_events"] = _merge_kv_events([snap.get("kv_events", []) for snap in snapshots])
    return out


def _merge_kv_events(per_process: list[list]) -> list:
    """Every process subscribes to every worker's events, so a stream's
    counts are the largest any process has (not their sum), and a stream
    is live only where it is live in every process; tokenizing is each
    process's own, and adds up."""
    merged: dict[tuple, list] = {}
    for rows in per_process:
        for tname, model, streams, tokenized, secs, reused in rows:
            have = merged.get((tname, model))
            if have is None:
                merged[(tname, model)] = [tname, model, {s["worker"]: dict(s) for s in streams}, tokenized, secs,
                                          reused]
                continue
            have[3] += tokenized
            have[4] += secs
            have[5] += reused
            for s in streams:
                into = have[2].setdefault(s["worker"], dict(s))
                if into is s or into == s:
                    continue
                for key in ("blocks", "unknown", "malformed", "gaps", "replays", "resyncs"):
                    into[key] = max(into[key], s[key])
                for key in ("received", "applied"):
                    into[key] = {t: max(n, s[key].get(t, 0)) for t, n in into[key].items()}
                if s["state"] != "live":
                    into["state"] = s["state"]
    return [[t, m, list(streams.values()), n, secs, reused] for t, m, streams, n, secs, reused in merged.values()]


class GatewayCollector:
    """Renders a data-plane snapshot and the control plane's own state: the
    worker set, the health checks' counts and other sources (discovery)."""

    def __init__(self, registry: Registry, health: HealthChecker, metric_sources: list[Callable[[], Iterator]]):
        self.registry = registry
        self.health = health
        self.metric_sources = metric_sources
        self.snapshot: dict = {}
        self.processes: Optional[list[dict]] = None   # per data-plane process, with --workers N

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield from self._http(snap)
        yield from self._workers(snap)
        yield from self._cache_aware(snap)
        if snap.get("kv_events"):
            yield from self._kv_events(snap["kv_events"])
        if self.processes is not None:
            yield from self._processes(self.processes)
        for source in self.metric_sources:
            yield from source()

    def _http(self, snap: dict) -> Iterator[Metric]:
        le = bucket_labels()
        requests = CounterMetricFamily("smg_http_requests", "Total HTTP requests by method and path",
                                       labels=["method", "path"])
        responses = CounterMetricFamily(
            "smg_http_responses", "Total HTTP responses by path, status_code and error_code",
            labels=["path", "status_code", "error_code"])
        durations = HistogramMetricFamily("smg_http_request_duration_seconds",
                                          "HTTP request duration by method and path", labels=["method", "path"])
        for path, r in snap["routes"].items():
            for method, n in r["requests"].items():
                requests.add_metric([method, path], n)
            for status, code, n in r["responses"]:
                responses.add_metric([path, str(status), code], n)
            for method, (counts, total) in r["durations"].items():
                durations.add_metric([method, path], list(zip(le, counts)), total)
        yield requests
        yield responses
        yield durations
        yield from self._router(snap)
        yield GaugeMetricFamily("smg_http_connections_active", "Currently active HTTP connections",
                                value=snap["connections"])
        yield CounterMetricFamily("smg_http_connections_shed", "Idle keep-alive connections closed at the "
                                  "file-descriptor limit", value=snap["connections_shed"])
        adm = snap["admission"]
        yield GaugeMetricFamily("smg_admission_inflight", "Proxied requests holding an admission slot",
                                value=adm["active"])
        yield GaugeMetricFamily("smg_admission_queue_depth", "Requests waiting for an admission slot",
                                value=adm["queue_depth"])
        rejected = CounterMetricFamily("smg_admission_rejected", "Requests refused with 429 by admission control",
                                       labels=["reason"])
        rejected.add_metric(["queue_full"], adm["rejected_full"])
        rejected.add_metric(["queue_timeout"], adm["rejected_timeout"])
        yield rejected

    def _router(self, snap: dict) -> Iterator[Metric]:
        """The reference's smg_router_* family (router_type and
        connection_mode are always "http" here)."""
        le = bucket_labels()
        labels = ["router_type", "backend_type", "connection_mode", "model", "endpoint"]
        requests = CounterMetricFamily(
            "smg_router_requests", "Total routed requests by router_type, backend_type, connection_mode, model, "
            "endpoint, streaming; model is the served model's id, unknown for a request that names no model, or "
            "other for a model the gateway does not serve", labels=labels + ["streaming"])
        for backend, model, endpoint, streaming, n in snap["router_requests"]:
            requests.add_metric(["http", backend, "http", model, endpoint, streaming], n)
        errors = CounterMetricFamily(
            "smg_router_request_errors", "Router errors by router_type, backend_type, connection_mode, model, "
            "endpoint, error_type", labels=labels + ["error_type"])
        for backend, model, endpoint, error_type, n in snap["router_errors"]:
            errors.add_metric(["http", backend, "http", model, endpoint, error_type], n)
        upstream = CounterMetricFamily(
            "smg_router_upstream_responses", "Upstream backend HTTP responses by router_type, status_code, "
            "error_code", labels=["router_type", "status_code", "error_code"])
        for status, code, n in snap["router_upstream"]:
            upstream.add_metric(["http", str(status), code], n)
        durations = HistogramMetricFamily(
            "smg_router_request_duration_seconds", "Router request duration by router_type, backend_type, "
            "connection_mode, model, endpoint", labels=labels)
        for backend, model, endpoint, counts, total in snap["router_durations"]:
            durations.add_metric(["http", backend, "http", model, endpoint], list(zip(le, counts)),
                                 total)
        yield requests
        yield errors
        yield upstream
        yield durations

    def _workers(self, snap: dict) -> Iterator[Metric]:
        # series are labelled by URL: a draining worker and its successor at
        # the same address (a re-created pod) must not both report
        by_url: dict[str, Worker] = {}
        for w in self.registry.all():
            if w.url not in by_url or by_url[w.url].state == DRAINING:
                by_url[w.url] = w
        counters = snap["workers"]
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
        connections = GaugeMetricFamily("smg_worker_upstream_connections", "Open connections to a worker",
                                        labels=["worker"])
        waiting = GaugeMetricFamily("smg_worker_upstream_connection_waiting",
                                    "Requests waiting for a connection to a worker (--max-connections-per-worker)",
                                    labels=["worker"])
        timeouts = CounterMetricFamily("smg_worker_connect_timeouts",
                                       "Connections to a worker given up after --worker-connect-timeout-secs",
                                       labels=["worker"])
        prefill_queue = GaugeMetricFamily("smg_worker_prefill_queue_chars",
                                          "cache_aware's estimate of a worker's queued prefill: characters of "
                                          "prompt sent and not yet answered (a streamed answer's first token), "
                                          "less what the routing tree says the worker holds",
                                          labels=["worker"])
        unanswered = GaugeMetricFamily("smg_worker_requests_unanswered",
                                       "Requests in flight to a worker that it has not begun answering (a "
                                       "streamed answer begins with its first token, any other when complete)",
                                       labels=["worker"])
        pool_size: dict[tuple[str, str], int] = {}
        zero = {"requests": 0, "inflight": 0, "cb_state": 0, "cb_failures": 0, "cb_successes": 0,
                "cb_ok": 0, "cb_fail": 0, "connections": 0, "waiting": 0, "connect_timeouts": 0,
                "prefill_queue_chars": 0, "unanswered": 0}
        for url, w in by_url.items():
            c = counters.get(w.id, zero)
            req_total.add_metric([url, w.model_id], c["requests"])
            active.add_metric([url], c["inflight"])
            health.add_metric([url], 1 if w.state == READY else 0)
            cb_state.add_metric([url], c["cb_state"])
            cb_fail.add_metric([url], c["cb_failures"])
            cb_succ.add_metric([url], c["cb_successes"])
            cb_outcomes.add_metric([url, "success"], c["cb_ok"])
            cb_outcomes.add_metric([url, "failure"], c["cb_fail"])
            connections.add_metric([url], c["connections"])
            waiting.add_metric([url], c["waiting"])
            timeouts.add_metric([url], c["connect_timeouts"])
            prefill_queue.add_metric([url], c["prefill_queue_chars"])
            unanswered.add_metric([url], c["unanswered"])
            key = (TYPE_NAMES[w.worker_type], w.model_id)
            pool_size[key] = pool_size.get(key, 0) + 1
        yield req_total
        yield active
        yield health
        yield cb_state
        yield cb_fail
        yield cb_succ
        yield cb_outcomes
        yield connections
        yield waiting
        yield timeouts
        yield prefill_queue
        yield unanswered
        transitions = CounterMetricFamily("smg_worker_cb_transitions",
                                          "Circuit breaker state transitions by worker, from, to",
                                          labels=["worker", "from", "to"])
        for url, old, new, n in snap["cb_transitions"]:
            if url in by_url:
                transitions.add_metric([url, old, new], n)
        yield transitions
        pool = GaugeMetricFamily("smg_worker_pool_size", "Current worker pool size by worker_type, connection_mode, model",
                                 labels=["worker_type", "connection_mode", "model"])
        for (wtype, model), n in pool_size.items():
            pool.add_metric([wtype, "http", model], n)
        yield pool
        checks = CounterMetricFamily("smg_worker_health_checks", "Health check results by worker_type and result",
                                     labels=["worker_type", "result"])
        for (wtype, result), n in self.health.results.items():
            checks.add_metric([wtype, result], n)
        yield checks
        retries = CounterMetricFamily("smg_worker_retries", "Total retry attempts by worker_type and endpoint",
                                      labels=["worker_type", "endpoint"])
        for wtype, endpoint, n in snap["retries"]:
            retries.add_metric([wtype, endpoint], n)
        yield retries
        exhausted = CounterMetricFamily("smg_worker_retries_exhausted",
                                        "Requests that failed after their last attempt, by worker_type and endpoint",
                                        labels=["worker_type", "endpoint"])
        for wtype, endpoint, n in snap["retries_exhausted"]:
            exhausted.add_metric([wtype, endpoint], n)
        yield exhausted

    def _cache_aware(self, snap: dict) -> Iterator[Metric]:
        tree = GaugeMetricFamily("smg_cache_aware_tree_chars",
                                 "Characters in a model's cache-aware routing tree", labels=["model", "worker_type"])
        share = GaugeMetricFamily("smg_cache_aware_worker_tree_chars",
                                  "Characters of the routing tree a worker holds", labels=["model", "worker"])
        decisions = CounterMetricFamily("smg_cache_aware_decisions",
                                        "cache_aware routing decisions: hit (to the prefix's owner), miss (placed "
                                        "by rendezvous hashing), spill (once to another worker, the owner "
                                        "overloaded), move (the prefix handed over: the owner kept spilling)",
                                        labels=["model", "worker_type", "decision"])
        changes = CounterMetricFamily("smg_cache_aware_placement_changes",
                                      "cache_aware requests sent away from their prefix's owner: change (spill: "
                                      "this request; move: the prefix's home) by reason (inflight: the owner's "
                                      "in-flight count over the spill gate; prefill_queue: its queued prefill "
                                      "costs more than re-prefilling elsewhere)",
                                      labels=["model", "worker_type", "change", "reason"])
        routed = CounterMetricFamily("smg_cache_aware_routed_chars", "Characters of prompt cache_aware routed",
                                     labels=["model", "worker_type"])
        expected = CounterMetricFamily("smg_cache_aware_expected_cached_chars",
                                       "Of those, the characters the chosen worker was expected to hold (its "
                                       "cache's own count says how right that was: the tree overestimates what an "
                                       "engine that evicts still holds; --kv-events-port reads it)",
                                       labels=["model", "worker_type"])
        for tname, model, total, shares, counts, by_reason in snap["cache_aware"]:
            routed.add_metric([model, tname], counts.get("routed_chars", 0))
            expected.add_metric([model, tname], counts.get("expected_cached_chars", 0))
            tree.add_metric([model, tname], total)
            for url, chars in shares.items():
                share.add_metric([model, url], chars)
            for decision in ("hit", "miss", "spill", "move"):
                decisions.add_metric([model, tname, decision], counts.get(decision, 0))
            for change, reason, n in by_reason:
                changes.add_metric([model, tname, change, reason], n)
        yield tree
        yield share
        yield decisions
        yield changes
        yield routed
        yield expected

    def _kv_events(self, rows: list) -> Iterator[Metric]:
        from smg.kv_events import EVENT_TYPES, STATE_NAMES

        received = CounterMetricFamily("smg_kv_events_received", "KV-cache events received from a worker's engine, "
                                       "by type", labels=["model", "worker", "type"])
        applied = CounterMetricFamily("smg_kv_events_applied", "KV-cache events applied to the worker's block "
                                      "index, by type (a block on another tier or of a LoRA adapter is not)",
                                      labels=["model", "worker", "type"])
        problems = CounterMetricFamily("smg_kv_events_stream_problems", "A worker's event stream: sequence gaps, "
                                       "replays asked, resyncs (the index rebuilt from nothing), malformed batches, "
                                       "events of unknown type", labels=["model", "worker", "problem"])
        blocks = GaugeMetricFamily("smg_kv_events_indexed_blocks", "KV-cache blocks a worker's engine holds, as "
                                   "its events say", labels=["model", "worker"])
        state = GaugeMetricFamily("smg_kv_events_stream_state", "1 for a worker's event stream state (live: "
                                  "routed by its events; otherwise by the character tree)",
                                  labels=["model", "worker", "state"])
        fallback = GaugeMetricFamily("smg_kv_events_workers_on_fallback", "Workers routed by the character tree "
                                     "because their event stream is not live", labels=["model"])
        tokenized = CounterMetricFamily("smg_kv_events_tokenized_requests", "Requests tokenized for precise "
                                        "routing: whole, or reusing a recent prompt's tokens for the start they "
                                        "share (prefix)", labels=["model", "reuse"])
        tokenize_secs = CounterMetricFamily("smg_kv_events_tokenize_seconds", "Time spent tokenizing and matching "
                                            "them", labels=["model"])
        for _, model, streams, n, secs, reused in rows:
            tokenized.add_metric([model, "prefix"], reused)
            tokenized.add_metric([model, "whole"], n - reused)
            tokenize_secs.add_metric([model], secs)
            fallback.add_metric([model], sum(1 for s in streams if s["state"] != "live"))
            for s in streams:
                w = s["worker"]
                for t in EVENT_TYPES:
                    received.add_metric([model, w, t], s["received"].get(t, 0))
                    applied.add_metric([model, w, t], s["applied"].get(t, 0))
                for problem in ("gaps", "replays", "resyncs", "malformed", "unknown"):
                    problems.add_metric([model, w, problem], s[problem])
                blocks.add_metric([model, w], s["blocks"])
                for name in STATE_NAMES:
                    state.add_metric([model, w, name], 1 if s["state"] == name else 0)
        yield from (received, applied, problems, blocks, state, fallback, tokenized, tokenize_secs)

    def _processes(self, processes: list[dict]) -> Iterator[Metric]:
        live = GaugeMetricFamily("smg_dataplane_processes", "Data-plane processes running (--workers)")
        live.add_metric([], sum(1 for p in processes if p["alive"]))
        yield live
        requests = CounterMetricFamily("smg_dataplane_requests", "HTTP requests served by each data-plane process "
                                       "since it started", labels=["process"])
        restarts = CounterMetricFamily("smg_dataplane_restarts", "Data-plane processes restarted after they died",
                                       labels=["process"])
        for p in processes:
            requests.add_metric([str(p["index"])], p["requests"])
            restarts.add_metric([str(p["index"])], p["restarts"])
        yield requests
        yield restarts


SnapshotSource = Callable[[], Union[dict, Awaitable[dict]]]


class MetricsEndpoint:
    """GET /metrics. `snapshot_source` returns the data-plane snapshot to
    render: directly (one process) or as an awaitable (asks every process)."""

    def __init__(self, collector: GatewayCollector, snapshot_source: SnapshotSource,
                 processes: Optional[Callable[[], list[dict]]] = None):
        self.collector = collector
        self.snapshot_source = snapshot_source
        self.processes = processes
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)  # type: ignore[arg-type]

    def extend(self, collector) -> None:
        self.registry.register(collector)

    def _render(self, snapshot: dict) -> Response:
        self.collector.snapshot = snapshot
        self.collector.processes = self.processes() if self.processes is not None else None
        return Response(200, generate_latest(self.registry), b"text/plain; version=0.0.4; charset=utf-8")

    def handle(self, req):
        snapshot = self.snapshot_source()
        if isinstance(snapshot, dict):
            return self._render(snapshot)

        async def later() -> Response:
            return self._render(await snapshot)

        return later()
