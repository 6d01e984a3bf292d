"""Wiring: builds the data plane (server core, router, proxy routes) and the
control plane (registry, registration, health checks, discovery, metrics)
on one uvloop event loop, and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import signal
import socket
from typing import Callable, Iterator, Optional

import uvloop

from smg import logs
from time import monotonic
from smg._fast.policies import (
    ConsistentHashPolicy,
    Policy,
    PowerOfTwoPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    Router,
)
from smg._fast.pd import PDHandler
from smg._fast.proxy import ProxyHandler, ProxySettings
from smg._fast.routing_text import ENDPOINTS
from smg._fast.server import Admission, Route, ServerCore
from smg._fast.worker import DECODE, PREFILL, REGULAR
from smg.admin import AdminRoutes
from smg.config import Config
from smg.handlers import GatewayRoutes
from smg.health import HealthChecker
from smg.metrics import MetricsEndpoint
from smg.registration import Registrar
from smg.workers import Registry

log = logging.getLogger("smg.gateway")

# request-id prefixes per proxied route, as the reference generates them
_ID_PREFIXES = {
    "/generate": b"gnt-",
    "/v1/chat/completions": b"chatcmpl-",
    "/v1/completions": b"cmpl-",
    "/v1/embeddings": b"embd-",
}

TICK_SECONDS = 0.1


class Gateway:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.router = Router(self.make_policy)
        self.registry = Registry(cfg, self.router, loop)
        self.registrar = Registrar(cfg, self.registry, loop)
        self.health = HealthChecker(cfg, self.registry, loop)
        self.proxy_settings = ProxySettings(
            self.router, loop,
            max_attempts=cfg.max_attempts,
            backoff_initial=cfg.retry_initial_backoff_ms / 1000.0,
            backoff_max=cfg.retry_max_backoff_ms / 1000.0,
            backoff_multiplier=cfg.retry_backoff_multiplier,
            backoff_jitter=cfg.retry_jitter_factor,
            request_timeout=cfg.request_timeout_secs,
        )
        self.core = ServerCore(
            loop,
            max_payload=cfg.max_payload_size,
            header_timeout=cfg.header_read_timeout_secs,
            idle_timeout=cfg.idle_connection_timeout_secs,
            api_key=cfg.api_key,
            admin_api_key=cfg.admin_api_key,
        )
        self.core.admission = Admission(cfg.max_concurrent_requests, cfg.queue_size, cfg.queue_timeout_secs)
        self.metrics_core = ServerCore(loop, max_payload=1 << 20, header_timeout=30.0, idle_timeout=90.0)
        self.metric_sources: list[Callable[[], Iterator]] = []
        self.metrics = MetricsEndpoint(self)
        self.routes = GatewayRoutes(self)
        self.admin = AdminRoutes(self)
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping = asyncio.Event()
        self.discovery = None
        self._tick_handle: Optional[asyncio.TimerHandle] = None
        self._last_slow_tick = 0.0
        self._last_eviction = monotonic()
        self._install_routes()

    # --- construction ---

    def make_policy(self, worker_type: int) -> Policy:
        name = self.cfg.policy_for({PREFILL: "prefill", DECODE: "decode"}.get(worker_type, "regular"))
        if name == "round_robin":
            return RoundRobinPolicy()
        if name == "random":
            return RandomPolicy()
        if name == "power_of_two":
            return PowerOfTwoPolicy()
        if name == "consistent_hashing":
            return ConsistentHashPolicy()
        if name == "cache_aware":
            from smg._fast.policies import CacheAwarePolicy

            cfg = self.cfg
            return CacheAwarePolicy(cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold,
                                    cfg.max_tree_size)
        raise ValueError(f"unknown policy {name!r}")

    def _install_routes(self) -> None:
        core = self.core
        handler_class = PDHandler if self.cfg.pd_disaggregation else ProxyHandler
        for path, endpoint in ENDPOINTS.items():
            handler = handler_class(self.proxy_settings, endpoint)
            core.add_route(Route(path, ["POST"], native=handler, auth="serving",
                                 id_prefix=_ID_PREFIXES.get(path, b"req-")))
        r = self.routes
        for path, fn in (("/health", r.health), ("/liveness", r.health), ("/readiness", r.readiness),
                         ("/v1/models", r.models), ("/get_server_info", r.server_info),
                         ("/get_model_info", r.model_info), ("/health_generate", r.health_generate)):
            core.add_route(Route(path, ["GET"], handler=fn, auth="none"))
        core.add_route(Route("/flush_cache", ["POST"], handler=r.flush_cache, auth="admin"))
        core.add_route(Route("/get_loads", ["GET"], handler=r.get_loads, auth="admin"))
        a = self.admin
        core.add_route(Route("/workers", ["GET", "POST"], handler=self._workers_root, auth="admin"))
        core.add_route(Route("/workers/", ["GET", "DELETE"], handler=a.worker_route, auth="admin"), prefix=True)
        self.metrics_core.add_route(Route("/metrics", ["GET"], handler=self.metrics.handle))

    def _workers_root(self, req):
        if req.method == b"POST":
            return self.admin.add_worker(req)
        return self.admin.list_workers(req)

    # --- running ---

    async def start(self) -> None:
        cfg = self.cfg
        self._update_date()
        self.servers.append(await self.loop.create_server(
            self.core.protocol_factory, cfg.host, cfg.port, backlog=4096))
        for sock in self.servers[0].sockets:
            log.info("smg listening on %s", _addr(sock))
        try:
            metrics_server = await self.loop.create_server(
                self.metrics_core.protocol_factory, cfg.prometheus_host, cfg.prometheus_port, backlog=128)
        except OSError as e:
            raise SystemExit(
                f"smg: error: cannot listen for metrics on {cfg.prometheus_host}:{cfg.prometheus_port}: {e}"
            ) from None
        self.servers.append(metrics_server)
        for sock in metrics_server.sockets:
            log.info("metrics on http://%s/metrics", _addr(sock))
        self._schedule_tick()
        self._add_static_workers()
        if cfg.service_discovery:
            from smg.discovery.reconcile import Discovery

            self.discovery = Discovery(self)
            self.discovery.start()

    def _add_static_workers(self) -> None:
        cfg = self.cfg
        specs: list[tuple[str, int, Optional[int]]] = [(u, REGULAR, None) for u in cfg.worker_urls]
        specs += [(p.url, PREFILL, p.bootstrap_port) for p in cfg.prefill]
        specs += [(u, DECODE, None) for u in cfg.decode]
        for url, wtype, bport in specs:
            try:
                w = self.registry.add(url, wtype, bport, source="static")
            except Exception as e:  # duplicates on the command line
                log.warning("Skipping worker %s: %s", url, e)
                continue
            self.registrar.register(w)

    def _schedule_tick(self) -> None:
        self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)

    def _tick(self) -> None:
        now = monotonic()
        try:
            self.core.tick(now)
            self.metrics_core.tick(now)
            if now - self._last_slow_tick >= 1.0:
                self._last_slow_tick = now
                self._update_date()
                for w in self.registry.all():
                    w.pool.sweep(now)
            if now - self._last_eviction >= self.cfg.eviction_interval_secs:
                self._last_eviction = now
                evicted = self.router.evict_all()
                if evicted:
                    log.debug("cache-aware trees: evicted %d characters", evicted)
        except Exception:
            log.exception("housekeeping tick failed")
        if not self.stopping.is_set() or self.core.connections:
            self._schedule_tick()

    def _update_date(self) -> None:
        self.core.date_header = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("Shutdown requested")
            self.stopping.set()

    async def shutdown(self) -> None:
        cfg = self.cfg
        core = self.core
        core.shutting_down = True
        for server in self.servers:
            server.close()
        core.close_idle()
        self.metrics_core.close_idle()
        active = core.active_requests
        if active:
            log.info("Finishing %d in-flight requests (grace period %.0f s)", active, cfg.shutdown_grace_period_secs)
        deadline = self.loop.time() + cfg.shutdown_grace_period_secs
        while core.active_requests and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if core.active_requests:
            log.warning("Grace period over: dropping %d requests", core.active_requests)
        for conn in list(core.connections):
            conn.abort()
        if self.discovery is not None:
            await self.discovery.stop()
        self.health.stop()
        for task in list(self.registrar.tasks.values()):
            task.cancel()
        for w in self.registry.all():
            w.pool.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        log.info("smg stopped")

    async def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self.stopping.wait()
        await self.shutdown()
        return 0


def _addr(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _raise_fd_limit() -> None:
    """A gateway holds a socket per client and per upstream connection: use
    every file descriptor the hard limit allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def run(cfg: Config) -> int:
    logs.setup(cfg.log_level, cfg.log_json, cfg.log_dir)
    _raise_fd_limit()
    if cfg.service_discovery:
        from kubernetes.config import ConfigException

        from smg.discovery.kubernetes import load_credentials

        try:
            load_credentials()
        except (ConfigException, OSError) as e:
            logging.getLogger("smg.discovery").error(
                "--service-discovery needs Kubernetes credentials: an in-cluster service account, "
                "or a kubeconfig ($KUBECONFIG or ~/.kube/config): %s", e)
            return 1

    async def main() -> int:
        gw = Gateway(cfg, asyncio.get_running_loop())
        return await gw.serve()

    try:
        return uvloop.run(main())
    except OSError as e:
        logging.getLogger("smg").error("cannot start: %s", e)
        return 1
