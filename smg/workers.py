"""The worker registry: the single source of truth for workers.

Every change of a worker's membership or state goes through `add`,
`activate`, `set_state`, `drain` and `remove`, which keep the router
(routing candidates and policy state), the connection pools and the
metrics in step. Nothing else mutates the worker set."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Callable, Optional

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
    def __init__(self, cfg: Config, router: Router, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.router = router
        self.loop = loop
        self.workers: dict[str, Worker] = {}
        self.by_url: dict[str, Worker] = {}
        self.sources: dict[str, str] = {}  # worker id -> "static" | "api" | "kubernetes"
        self.cb_transitions: dict[tuple[str, str, str], int] = {}
        self.listeners: list[Callable[[str, Worker], None]] = []
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
            model_id: Optional[str] = None) -> Worker:
        """Register a URL as a pending worker. Raises ValueError on a bad URL
        and DuplicateWorker when the URL is already registered."""
        url = normalize_url(url)
        existing = self.by_url.get(url)
        if existing is not None:
            raise DuplicateWorker(existing)
        w = Worker(str(uuid.uuid4()), url, model_id or "unknown", worker_type, bootstrap_port,
                   dict(labels or {}), api_key)
        w.pool = UpstreamPool(w.host, w.port, self.cfg.upstream_pool_idle_timeout_secs, self.loop)
        w.cb_enabled = not self.cfg.disable_circuit_breaker
        w.cb_failure_threshold = self.cfg.cb_failure_threshold
        w.cb_success_threshold = self.cfg.cb_success_threshold
        w.cb_timeout = self.cfg.cb_timeout_duration_secs
        w.cb_listener = self._on_cb_transition
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
        w.state = READY
        self.router.add_worker(w)
        log.info("Registered worker: %s", w.url)
        self._notify("ready", w)

    def set_state(self, w: Worker, state: int) -> None:
        if w.id not in self.workers or w.state == state or w.state == DRAINING:
            return
        old = w.state
        w.state = state
        self.router.refresh_worker(w)
        level = logging.INFO if state == READY else logging.WARNING
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
        deadline = self.loop.time() + self.cfg.drain_timeout_secs
        if w.inflight > 0:
            log.info("Draining worker %s (%d in flight)", w.url, w.inflight)
        while w.inflight > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if w.inflight > 0:
            log.warning("Worker %s still had %d requests in flight after %.0f s; removing it",
                        w.url, w.inflight, self.cfg.drain_timeout_secs)
        self.remove(w, reason)

    def remove(self, w: Worker, reason: str = "removed") -> None:
        """Forget the worker now: routing, policies (its cache-tree share
        too), connections, metrics."""
        if self.workers.pop(w.id, None) is None:
            return
        if self.by_url.get(w.url) is w:
            del self.by_url[w.url]
        self.sources.pop(w.id, None)
        self._drains.pop(w.id, None)
        if w.state != DRAINING:
            w.state = DRAINING
        self.router.remove_worker(w)
        w.pool.close()
        for key in [k for k in self.cb_transitions if k[0] == w.url]:
            del self.cb_transitions[key]
        log.info("Removed worker: %s (%s)", w.url, reason)
        self._notify("removed", w)

    def _on_cb_transition(self, w: Worker, old: int, new: int) -> None:
        names = ("closed", "open", "half_open")
        key = (w.url, names[old], names[new])
        self.cb_transitions[key] = self.cb_transitions.get(key, 0) + 1
        level = logging.WARNING if new == 1 else logging.INFO
        log.log(level, "Circuit breaker for %s: %s -> %s", w.url, names[old], names[new])

    def _notify(self, event: str, w: Worker) -> None:
        for listener in self.listeners:
            try:
                listener(event, w)
            except Exception:
                log.exception("worker listener failed")

    async def wait_drains(self) -> None:
        tasks = list(self._drains.values())
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- views ---

    def info(self, w: Worker) -> dict:
        """WorkerInfo, as GET /workers shows it (SPEC.md §2)."""
        models = []
        if w.model_id != "unknown" or w.info:
            mi = w.info.get("model_info") or {}
            models.append({
                "id": w.model_id,
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
            "labels": dict(w.labels),
            "is_healthy": w.state == READY,
            "status": STATE_NAMES[w.state],
            "load": w.inflight,
        }


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    split_url(url)  # raises ValueError
    return url


def _done_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task:
    async def nothing() -> None:
        return None

    return loop.create_task(nothing())


__all__ = ["Registry", "DuplicateWorker", "WORKER_TYPES", "PENDING", "READY", "NOT_READY", "FAILED", "DRAINING"]
