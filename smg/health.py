"""Periodic health checks and the worker state machine.

Each registered worker gets its own probe schedule: GET
{url}{--health-check-endpoint} every --health-check-interval-secs, any 2xx
is a success.

    pending/not_ready --success_threshold successes--> ready
    ready --failure_threshold failures--> not_ready
    not_ready --3 x failure_threshold more failures--> failed
    failed: drained and removed with --remove-unhealthy-workers; otherwise
            still probed, and back to ready after success_threshold
            successes (the reference leaves it failed for good)
"""

from __future__ import annotations

import asyncio
import logging
import random

from smg._fast.fetch import fetch
from smg._fast.worker import DRAINING, FAILED, NOT_READY, PENDING, READY, TYPE_NAMES, Worker
from smg.config import Config
from smg.registration import probe_failure
from smg.workers import Registry

log = logging.getLogger("smg.health")


class HealthChecker:
    def __init__(self, cfg: Config, registry: Registry, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.registry = registry
        self.loop = loop
        self.tasks: dict[str, asyncio.Task] = {}
        # smg_worker_health_checks_total{worker_type,result}
        self.results: dict[tuple[str, str], int] = {}
        self.enabled = not cfg.disable_health_check
        registry.listeners.append(self._on_worker_event)

    def _on_worker_event(self, event: str, w: Worker) -> None:
        if event == "ready" and self.enabled and w.id not in self.tasks:
            self.tasks[w.id] = self.loop.create_task(self._watch(w))
        elif event in ("draining", "removed"):
            task = self.tasks.pop(w.id, None)
            if task is not None:
                task.cancel()

    def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    async def probe(self, w: Worker) -> bool:
        headers = [("authorization", f"Bearer {w.api_key}")] if w.api_key else None
        try:
            res = await fetch(w.control_pool, "GET", self.cfg.health_check_endpoint, headers=headers,
                              timeout=self.cfg.health_check_timeout_secs)
            ok = 200 <= res.status < 300
            if not ok:
                w.note_error(f"health check: {self.cfg.health_check_endpoint} answered {res.status}")
        except (OSError, asyncio.TimeoutError) as e:
            ok = False
            w.note_error("health check: " + probe_failure(e, self.cfg.health_check_timeout_secs))
        key = (TYPE_NAMES[w.worker_type], "success" if ok else "failure")
        self.results[key] = self.results.get(key, 0) + 1
        return ok

    async def _watch(self, w: Worker) -> None:
        cfg = self.cfg
        interval = cfg.health_check_interval_secs
        successes = 0
        failures = 0
        # spread the first probes of many workers over one interval
        await asyncio.sleep(interval * (0.5 + random.random() / 2))
        while self.registry.get(w.id) is w and w.state != DRAINING:
            ok = await self.probe(w)
            if self.registry.get(w.id) is not w or w.state == DRAINING:
                return
            if ok:
                failures = 0
                successes += 1
                if w.state in (PENDING, NOT_READY, FAILED) and successes >= cfg.health_success_threshold:
                    self.registry.set_state(w, READY)
            else:
                successes = 0
                failures += 1
                if w.state == READY and failures >= cfg.health_failure_threshold:
                    self.registry.set_state(w, NOT_READY)
                elif w.state == NOT_READY and failures >= 4 * cfg.health_failure_threshold:
                    self.registry.set_state(w, FAILED)
                    if cfg.remove_unhealthy_workers:
                        log.warning("Removing unhealthy worker %s", w.url)
                        self.registry.drain(w, "unhealthy")
                        self.tasks.pop(w.id, None)
                        return
            await asyncio.sleep(interval)
        self.tasks.pop(w.id, None)
