"""Registering a worker: wait for its health endpoint, learn what
it serves (/model_info, /server_info, /v1/models), then hand it to the
registry as ready. Registrations run concurrently, bounded, as background
tasks: they never block routing."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Optional

import orjson

from smg._fast.fetch import fetch
from smg._fast.worker import Worker
from smg.config import Config
from smg.workers import Registry

log = logging.getLogger("smg.registration")


class RegistrationFailed(Exception):
    pass


def probe_failure(e: BaseException, timeout: float) -> str:
    """Why a probe failed, in an operator's words."""
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {timeout:g} s (timed out)"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(e, socket.gaierror):
        return f"DNS lookup failed ({e.strerror or e})"
    if isinstance(e, ConnectionResetError):
        return "connection reset by the worker"
    return str(e) or type(e).__name__


async def get_json(w: Worker, path: str, timeout: float) -> tuple[int, Any]:
    """GET a worker path; (status, parsed JSON or None). Transport errors raise."""
    headers = [("authorization", f"Bearer {w.api_key}")] if w.api_key else None
    res = await fetch(w.control_pool, "GET", path, headers=headers, timeout=timeout)
    body = None
    if 200 <= res.status < 300 and res.body:
        try:
            body = orjson.loads(res.body)
        except orjson.JSONDecodeError:
            body = None
    return res.status, body


def choose_model_id(override: Optional[str], server_info: dict, model_info: dict, models: list) -> str:
    """discovery override > served_model_name > model_id > model_path > "unknown"."""
    if override:
        return override
    served = server_info.get("served_model_name") or model_info.get("served_model_name")
    if not served and models:
        served = models[0].get("id")
    for candidate in (served, server_info.get("model_id"), model_info.get("model_path"),
                      server_info.get("model_path")):
        if isinstance(candidate, str) and candidate:
            return candidate
    return "unknown"


class Registrar:
    def __init__(self, cfg: Config, registry: Registry, loop: asyncio.AbstractEventLoop, concurrency: int = 64):
        self.cfg = cfg
        self.registry = registry
        self.loop = loop
        self.slots = asyncio.Semaphore(concurrency)
        self.tasks: dict[str, asyncio.Task] = {}

    def register(self, w: Worker, model_override: Optional[str] = None) -> asyncio.Task:
        task = self.loop.create_task(self._run(w, model_override))
        self.tasks[w.id] = task
        task.add_done_callback(lambda t, wid=w.id: self.tasks.pop(wid, None))
        return task

    def cancel(self, w: Worker) -> None:
        task = self.tasks.pop(w.id, None)
        if task is not None:
            task.cancel()

    async def _run(self, w: Worker, model_override: Optional[str]) -> bool:
        try:
            async with self.slots:
                await self._wait_healthy(w)
                model_id, info = await self._probe(w, model_override)
        except asyncio.CancelledError:
            raise
        except RegistrationFailed as e:
            log.error("Failed to register worker %s: %s", w.url, e)
            self.registry.remove(w, "registration failed")
            return False
        except Exception as e:  # a bug or an unexpected answer: never leave it pending forever
            log.exception("Failed to register worker %s: %r", w.url, e)
            self.registry.remove(w, "registration failed")
            return False
        if self.registry.get(w.id) is not w:
            return False  # removed while we were probing
        self.registry.activate(w, model_id, info)
        return True

    async def _wait_healthy(self, w: Worker) -> None:
        deadline = self.loop.time() + self.cfg.worker_startup_timeout_secs
        interval = self.cfg.worker_startup_check_interval
        if self.cfg.worker_startup_delay > 0:
            # --worker-startup-delay: the engine is known to need this long
            await asyncio.sleep(self.cfg.worker_startup_delay)
        delay = min(0.1, interval)
        last_error = "no answer"
        started = self.loop.time()
        warn_at = started + 1.0   # a worker starting up may refuse for a moment: say so after a second
        warn_every = 2.0
        while True:
            try:
                status, _ = await get_json(w, self.cfg.health_check_endpoint,
                                           min(self.cfg.health_check_timeout_secs, interval))
                if 200 <= status < 300:
                    if self.loop.time() > warn_at:
                        log.info("Worker %s is healthy after %.0f s", w.url, self.loop.time() - started)
                    return
                last_error = f"{self.cfg.health_check_endpoint} answered {status}"
            except (OSError, asyncio.TimeoutError) as e:
                last_error = probe_failure(e, self.cfg.health_check_timeout_secs)
            if self.registry.get(w.id) is not w:
                raise asyncio.CancelledError()
            now = self.loop.time()
            remaining = deadline - now
            if remaining <= 0:
                raise RegistrationFailed(
                    f"not healthy within {self.cfg.worker_startup_timeout_secs:g} s ({last_error})")
            if now >= warn_at:
                # repeated with backoff, up to once a minute
                log.warning("Worker %s is not reachable yet: %s (waiting up to %.0f s more, "
                            "--worker-startup-timeout-secs)", w.url, last_error, remaining)
                warn_at = now + warn_every
                warn_every = min(warn_every * 2, 60.0)
            log.debug("worker %s not ready yet (%s); next check in %.2f s", w.url, last_error, delay)
            await asyncio.sleep(min(delay, remaining))
            # start quick (a pod that just turned Ready answers at once) and
            # back off to --worker-startup-check-interval
            delay = min(delay * 2, interval)

    async def _probe(self, w: Worker, model_override: Optional[str]) -> tuple[str, dict]:
        timeout = self.cfg.health_check_timeout_secs
        model_info: dict = {}
        server_info: dict = {}
        models: list = []
        status, body = await self._get(w, "/model_info", timeout)
        if status == 404:
            status, body = await self._get(w, "/get_model_info", timeout)
        if isinstance(body, dict):
            model_info = body
        elif status != 404:
            log.warning("worker %s: model_info answered %s", w.url, status)
        status, body = await self._get(w, "/server_info", timeout)
        if status == 404:
            status, body = await self._get(w, "/get_server_info", timeout)
        if isinstance(body, dict):
            server_info = body
        status, body = await self._get(w, "/v1/models", timeout)
        runtime = "sglang"
        if isinstance(body, dict) and isinstance(body.get("data"), list):
            models = [m for m in body["data"] if isinstance(m, dict)]
            if any(m.get("owned_by") == "vllm" for m in models):
                runtime = "vllm"
        model_id = choose_model_id(model_override, server_info, model_info, models)
        info = {"model_info": model_info, "server_info": server_info, "runtime_type": runtime}
        return model_id, info

    async def _get(self, w: Worker, path: str, timeout: float) -> tuple[int, Any]:
        try:
            return await get_json(w, path, timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("worker %s: GET %s failed: %s", w.url, path, e or type(e).__name__)
            return 0, None
