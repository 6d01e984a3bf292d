"""The worker registry: the single source of truth for workers.

Every change of a worker's membership or state goes through `add`,
`activate`, `set_state`, `drain` and `remove`, which keep the router
(routing candidates and policy state), the connection pools and the
metrics in step. Nothing else mutates the worker set."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
import time
import uuid
from typing import Awaitable, Callable, Optional

from smg._fast.policies import Router
from smg._fast.upstream import UpstreamPool
from smg._fast.worker import (
    DRAINING,
    FAILED,
    NOT_READY,
    PENDING,
    PREFILL,
    READY,
    REGULAR,
    STATE_NAMES,
    TYPE_NAMES,
    Worker,
    split_url,
)
from smg.config import Config

log = logging.getLogger("smg.workers")

WORKER_TYPES = {"regular": REGULAR, "prefill": PREFILL, "decode": 2}


class DuplicateWorker(Exception):
    def __init__(self, existing: Worker):
        super().__init__(f"Worker already exists at URL '{existing.url}' with ID {existing.id}")
        self.existing = existing


class Registry:
    """`announce`: log membership changes at INFO (the control plane's
    registry); a data-plane process's mirror of it logs them at DEBUG."""

    def __init__(self, cfg: Config, router: Router, loop: asyncio.AbstractEventLoop, announce: bool = True):
        self.cfg = cfg
        self.router = router
        self.loop = loop
        self.announce = announce
        self.info_level = logging.INFO if announce else logging.DEBUG
        # waits until no request is in flight on a draining worker (or the
        # deadline passes); with --workers N the in-flight requests are in the
        # data-plane processes, and the supervisor replaces this
        self.wait_idle: Callable[[Worker, float], Awaitable[None]] = self._wait_local_idle
        self.workers: dict[str, Worker] = {}
        self.by_url: dict[str, Worker] = {}
        self.sources: dict[str, str] = {}  # worker id -> "static" | "api" | "kubernetes"
        self.overrides: dict[str, dict] = {}  # worker id -> priority/cost set by PATCH /workers/{id}
        self.cb_transitions: dict[tuple[str, str, str], int] = {}
        # --prefill-max-inflight-requests-per-worker, and the data plane's
        # prefill queue told when a prefill worker frees a slot (limit_prefill)
        self.prefill_limit = 0
        self._tls_client: Optional[ssl.SSLContext] = None
        self.prefill_capacity_listener: Optional[Callable[[Worker], None]] = None
        self.listeners: list[Callable[[str, Worker], None]] = []
        # --kv-events-port: {worker id: its KV-event stream as GET /workers shows it}
        self.kv_event_streams: Optional[Callable[[], dict]] = None
        self._drains: dict[str, asyncio.Task] = {}
        self._removed_event = asyncio.Event()

    # --- queries ---

    def get(self, worker_id: str) -> Optional[Worker]:
        return self.workers.get(worker_id)

    def find_url(self, url: str) -> Optional[Worker]:
        return self.by_url.get(normalize_url(url))

    def all(self) -> list[Worker]:
        return list(self.workers.values())

    def of_type(self, worker_type: int) -> list[Worker]:
        return [w for w in self.workers.values() if w.worker_type == worker_type]

    def ready(self, worker_type: Optional[int] = None) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.state == READY and (worker_type is None or w.worker_type == worker_type)]

    def source_of(self, w: Worker) -> str:
        return self.sources.get(w.id, "static")

    # --- changes ---

    def add(self, url: str, worker_type: int = REGULAR, bootstrap_port: Optional[int] = None,
            labels: Optional[dict] = None, api_key: Optional[str] = None, source: str = "static",
            model_id: Optional[str] = None, worker_id: Optional[str] = None) -> Worker:
        """Register a URL as a pending worker. Raises ValueError on a bad URL
        and DuplicateWorker when the URL is already registered."""
        url = normalize_url(url)
        existing = self.by_url.get(url)
        if existing is not None:
            raise DuplicateWorker(existing)
        w = Worker(worker_id or str(uuid.uuid4()), url, model_id or "unknown", worker_type, bootstrap_port,
                   dict(labels or {}), api_key)
        tls = self.tls_client() if w.tls else None
        w.pool = UpstreamPool(w.host, w.port, self.cfg.upstream_pool_idle_timeout_secs, self.loop,
                              self.cfg.worker_connect_timeout_secs, self.cfg.max_connections_per_worker, tls)
        w.control_pool = UpstreamPool(w.host, w.port, self.cfg.upstream_pool_idle_timeout_secs, self.loop,
                                      self.cfg.worker_connect_timeout_secs, 0, tls)
        w.cb_enabled = not self.cfg.disable_circuit_breaker
        w.cb_failure_threshold = self.cfg.cb_failure_threshold
        w.cb_success_threshold = self.cfg.cb_success_threshold
        w.cb_timeout = self.cfg.cb_timeout_duration_secs
        w.cb_window = self.cfg.cb_window_duration_secs
        w.cb_listener = self._on_cb_transition
        if worker_type == PREFILL and self.prefill_limit > 0:
            w.max_inflight = self.prefill_limit
            w.capacity_listener = self.prefill_capacity_listener
        self.workers[w.id] = w
        self.by_url[url] = w
        self.sources[w.id] = source
        self._notify("added", w)
        return w

    def activate(self, w: Worker, model_id: str, info: dict) -> None:
        """Registration learned the worker's model: it becomes routable."""
        if w.id not in self.workers or w.state == DRAINING:
            return
        w.model_id = model_id
        w.info = info
        if self.cfg.dp_aware and w.dp_size == 0:
            w.dp_size = dp_size_of(info)
        w.state = READY
        self.router.add_worker(w)
        log.log(self.info_level, "Registered worker: %s", w.url)
        self._notify("ready", w)

    def set_state(self, w: Worker, state: int) -> None:
        if w.id not in self.workers or w.state == state or w.state == DRAINING:
            return
        old = w.state
        w.state = state
        self.router.refresh_worker(w)
        level = logging.WARNING if state != READY and self.announce else self.info_level
        log.log(level, "Worker %s: %s -> %s", w.url, STATE_NAMES[old], STATE_NAMES[state])
        self._notify("state", w)

    def drain(self, w: Worker, reason: str = "removed") -> asyncio.Task:
        """Stop routing to the worker at once; remove it when its in-flight
        requests have finished (at most --drain-timeout-secs)."""
        task = self._drains.get(w.id)
        if task is not None:
            return task
        if w.id not in self.workers:
            return _done_task(self.loop)
        if w.state != DRAINING:
            w.state = DRAINING
            self.router.refresh_worker(w)
            # the URL is free at once: a pod re-created at the same address
            # registers while this one finishes its requests
            if self.by_url.get(w.url) is w:
                del self.by_url[w.url]
            self._notify("draining", w)
        task = self.loop.create_task(self._drain(w, reason))
        self._drains[w.id] = task
        return task

    async def _drain(self, w: Worker, reason: str) -> None:
        await self.wait_idle(w, self.loop.time() + self.cfg.drain_timeout_secs)
        self.remove(w, reason)

    async def _wait_local_idle(self, w: Worker, deadline: float) -> None:
        if w.inflight > 0:
            log.log(self.info_level, "Draining worker %s (%d in flight)", w.url, w.inflight)
        while w.inflight > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if w.inflight > 0:
            log.warning("Worker %s still had %d requests in flight after %.0f s; removing it",
                        w.url, w.inflight, self.cfg.drain_timeout_secs)

    def remove(self, w: Worker, reason: str = "removed") -> None:
        """Forget the worker now: routing, policies (its cache-tree share
        too), connections, metrics."""
        if self.workers.pop(w.id, None) is None:
            return
        if self.by_url.get(w.url) is w:
            del self.by_url[w.url]
        self.sources.pop(w.id, None)
        self.overrides.pop(w.id, None)
        self._drains.pop(w.id, None)
        if w.state != DRAINING:
            w.state = DRAINING
        self.router.remove_worker(w)
        w.pool.close()
        w.control_pool.close()
        for key in [k for k in self.cb_transitions if k[0] == w.url]:
            del self.cb_transitions[key]
        log.log(self.info_level, "Removed worker: %s (%s)", w.url, reason)
        self._notify("removed", w)

    def _on_cb_transition(self, w: Worker, old: int, new: int) -> None:
        names = ("closed", "open", "half_open")
        key = (w.url, names[old], names[new])
        self.cb_transitions[key] = self.cb_transitions.get(key, 0) + 1
        level = logging.WARNING if new == 1 else logging.INFO
        log.log(level, "Circuit breaker for %s: %s -> %s", w.url, names[old], names[new])

    def labels_changed(self, w: Worker) -> None:
        """PATCH changed w's labels: routing follows the ones it reads (its
        KV-event endpoints), here and in the data-plane processes."""
        self.router.refresh_worker(w)
        self._notify("labels", w)

    def _notify(self, event: str, w: Worker) -> None:
        for listener in self.listeners:
            try:
                listener(event, w)
            except Exception:
                log.exception("worker listener failed")

    def tls_client(self) -> ssl.SSLContext:
        """The TLS context of https:// workers (made once, when the first one comes)."""
        if self._tls_client is None:
            from smg.tls import client_context

            self._tls_client = client_context(self.cfg.ca_cert_paths, self.cfg.client_cert_path,
                                              self.cfg.client_key_path)
        return self._tls_client

    def limit_prefill(self, limit: int, listener: Callable[[Worker], None]) -> None:
        """Prefill workers take at most `limit` requests in flight; `listener`
        hears when one drops below (this process's counts)."""
        self.prefill_limit = limit
        self.prefill_capacity_listener = listener
        for w in self.of_type(PREFILL):
            w.max_inflight = limit
            w.capacity_listener = listener

    # --- mirroring (--workers N) ---

    @staticmethod
    def record(w: Worker) -> dict:
        """What a data-plane process needs to know of a worker to route to it."""
        return {"id": w.id, "url": w.url, "model_id": w.model_id, "worker_type": w.worker_type,
                "bootstrap_port": w.bootstrap_port, "api_key": w.api_key, "state": w.state,
                "dp_size": w.dp_size,
                # of the labels, the ones routing reads: where its KV events are published
                "labels": {k: v for k, v in (w.labels or {}).items() if k in (KV_EVENTS_LABEL, KV_REPLAY_LABEL)}}

    def apply(self, rec: dict) -> Optional[Worker]:
        """Bring this registry (a data-plane process's mirror) in line with
        one worker record from the control plane."""
        w = self.workers.get(rec["id"])
        if w is None:
            if rec["state"] == DRAINING:
                return None  # never routed here; nothing to drain
            stale = self.by_url.get(rec["url"])
            if stale is not None:  # re-registered under a new id while this one was missed
                self.remove(stale, "replaced")
            w = self.add(rec["url"], rec["worker_type"], rec["bootstrap_port"], dict(rec.get("labels") or {}),
                         rec["api_key"], source="control-plane", model_id=rec["model_id"], worker_id=rec["id"])
        elif rec.get("labels", {}) != {k: v for k, v in (w.labels or {}).items()
                                       if k in (KV_EVENTS_LABEL, KV_REPLAY_LABEL)}:
            w.labels = {k: v for k, v in (w.labels or {}).items() if k not in (KV_EVENTS_LABEL, KV_REPLAY_LABEL)}
            w.labels.update(rec.get("labels") or {})
            self.router.refresh_worker(w)       # an event stream follows its new address
        if w.state == PENDING:
            w.dp_size = rec.get("dp_size", 0)
        state = rec["state"]
        if state == DRAINING:
            self.drain(w, "control plane")
        elif w.state == PENDING and state != PENDING:
            self.activate(w, rec["model_id"], {})
            self.set_state(w, state)
        elif state != w.state:
            self.set_state(w, state)
        return w

    # --- views ---

    def info(self, w: Worker) -> dict:
        """WorkerInfo, as GET /workers shows it (the reference's shape)."""
        models = []
        mi = w.info.get("model_info") or {}
        if w.model_id != "unknown" or w.info:
            models.append({
                "id": w.model_id,
                "model_type": list(CAPABILITIES if mi.get("is_generation", True) else EMBEDDING_CAPABILITIES),
                "hf_model_type": mi.get("model_type"),
                "architectures": mi.get("architectures"),
                "tokenizer_path": mi.get("tokenizer_path"),
            })
        return {
            "id": w.id,
            "url": w.url,
            "model_id": w.model_id,
            "models": models,
            "worker_type": TYPE_NAMES[w.worker_type],
            "connection_mode": "http",
            "runtime_type": w.info.get("runtime_type", "sglang"),
            "bootstrap_port": w.bootstrap_port,
            "labels": {**engine_labels(w.info.get("server_info") or {}, mi), **w.labels},
            # the reference's defaults, or what PATCH set; smg's policies do not weigh them
            "priority": self.overrides.get(w.id, {}).get("priority", 50),
            "cost": self.overrides.get(w.id, {}).get("cost", 1.0),
            "max_connection_attempts": 20,
            "is_healthy": w.state == READY,
            "status": STATE_NAMES[w.state],
            "load": w.inflight,
            "http2": False,
            # why a healthy-looking worker may get no traffic, and what failed last
            "circuit_breaker": _breaker(w),
            "last_error": {"message": w.last_error, "at": _iso(w.last_error_at)} if w.last_error else None,
            **self._dp_info(w),
            **({"kv_events": self.kv_event_streams().get(w.id)} if self.kv_event_streams is not None else {}),
        }

    @staticmethod
    def _dp_info(w: Worker) -> dict:
        """--dp-aware: the engine's ranks, each routed to as URL@rank."""
        if w.dp_size <= 1:
            return {}
        return {"dp_size": w.dp_size,
                "dp_ranks": [{"dp_rank": v.dp_rank, "url": v.url, "load": v.inflight,
                              "circuit_breaker": v.cb_state_name} for v in w.dp_views]}


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.timezone.utc).isoformat(timespec="seconds")


def _breaker(w: Worker) -> dict:
    """The worker's circuit breaker: its state, the failures counted, and
    when an open one lets a request through again."""
    if not w.cb_enabled:
        return {"state": "disabled"}
    out: dict = {"state": w.cb_state_name, "consecutive_failures": w.cb_failures}
    if w.cb_state_name == "open":
        open_for = time.monotonic() - w.cb_opened_at
        out["opened_at"] = _iso(time.time() - open_for)
        out["retry_in_secs"] = round(max(0.0, w.cb_timeout - open_for), 1)
    return out


def dp_size_of(info: dict) -> int:
    """The engine's data-parallel size, from its server info (1 when unknown)."""
    size = (info.get("server_info") or {}).get("dp_size")
    return size if isinstance(size, int) and 0 < size <= 1024 else 1


# what a worker serves, as the reference lists it in WorkerInfo.models[].model_type
CAPABILITIES = ("chat", "completions", "responses", "tools")
EMBEDDING_CAPABILITIES = ("embeddings",)
SERVER_INFO_LABELS = ("model_path", "served_model_name", "tp_size", "dp_size", "max_running_requests", "version")
MODEL_INFO_LABELS = ("model_path", "served_model_name", "tokenizer_path", "is_generation",
                     "has_image_understanding", "model_type", "architectures")


def engine_labels(server_info: dict, model_info: dict) -> dict[str, str]:
    """The labels the reference derives from a worker's server and model info
    (strings: JSON for lists, true/false for booleans)."""
    out: dict[str, str] = {}
    for source, keys in ((server_info, SERVER_INFO_LABELS), (model_info, MODEL_INFO_LABELS)):
        for key in keys:
            value = source.get(key)
            if value is None:
                continue
            if isinstance(value, bool):
                out[key] = "true" if value else "false"
            elif isinstance(value, (list, dict)):
                out[key] = json.dumps(value, separators=(",", ":"))
            else:
                out[key] = str(value)
    return out


# a worker's own KV-event publisher and replay socket (--kv-events-port): a
# label set through the admin API or the file manifest, or made from the
# pod annotations KV_EVENTS_PORT_ANNOTATION / KV_REPLAY_PORT_ANNOTATION
KV_EVENTS_LABEL = "smg.ai/kv-events-endpoint"
KV_REPLAY_LABEL = "smg.ai/kv-events-replay-endpoint"
KV_EVENTS_PORT_ANNOTATION = "smg.ai/kv-events-port"
KV_REPLAY_PORT_ANNOTATION = "smg.ai/kv-events-replay-port"


def endpoint_label_error(labels: dict) -> Optional[str]:
    """What is wrong with a worker's KV-event endpoint labels (None: nothing)."""
    for key in (KV_EVENTS_LABEL, KV_REPLAY_LABEL):
        value = labels.get(key)
        if value is None:
            continue
        if value.startswith("ipc://") and len(value) > 6:
            continue
        host, sep, port = value[6:].rpartition(":") if value.startswith("tcp://") else ("", "", "")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            return f"label {key!r} must be tcp://HOST:PORT or ipc://PATH, got {value!r}"
    return None


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    split_url(url)  # raises ValueError
    return url


def _done_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task:
    async def nothing() -> None:
        return None

    return loop.create_task(nothing())


__all__ = ["Registry", "DuplicateWorker", "WORKER_TYPES", "PENDING", "READY", "NOT_READY", "FAILED", "DRAINING"]
