"""Wiring of the two planes.

- `DataPlane`: the client-facing server core, the router and the proxied
  routes; it serves traffic.
- `ControlPlane`: the registry's owner (registration, health checks,
  discovery), the admin and informational routes, /metrics.

`Gateway` runs both on one uvloop event loop (the default, --workers 1).
With --workers N, `smg.supervisor` runs the control plane in the main
process and N data-plane processes (`smg.dataplane`) beside it."""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import signal
import socket
import ssl
from time import monotonic
from typing import Awaitable, Callable, Iterator, Optional

import uvloop

from smg import __version__, logs
from smg._fast.pd import PDHandler, PrefillQueue
from smg._fast.policies import (
    ASSIGNMENT_MODES,
    BucketPolicy,
    CacheAwarePolicy,
    ConsistentHashPolicy,
    LeastLoadPolicy,
    ManualPolicy,
    PassthroughPolicy,
    Policy,
    PowerOfTwoPolicy,
    PrefixHashPolicy,
    RandomPolicy,
    RoundRobinPolicy,
    Router,
)
from smg._fast.call import CallSettings, stop_overdue_legs
from smg._fast.proxy import ProxyHandler
from smg._fast.routing_text import ENDPOINTS
from smg._fast.admission import Admission
from smg._fast.request import map_large_allocations, release_free_memory
from smg._fast.routes import Route, set_buckets
from smg._fast.server import ServerCore
from smg._fast.worker import DECODE, PREFILL, REGULAR
from smg.admin import AdminRoutes
from smg.config import Config
from smg.conversations import ConversationRoutes, ConversationStore
from smg.handlers import GatewayRoutes
from smg.health import HealthChecker
from smg.metrics import GatewayCollector, MetricsEndpoint, SnapshotSource, dataplane_snapshot
from smg.registration import Registrar
from smg.tls import ServerCertificate
from smg.workers import Registry

log = logging.getLogger("smg.gateway")

# request-id prefixes per proxied route, as the reference generates them
_ID_PREFIXES = {
    "/generate": b"gnt-",
    "/v1/chat/completions": b"chatcmpl-",
    "/v1/completions": b"cmpl-",
    "/v1/embeddings": b"embd-",
    "/v1/responses": b"resp_",
    "/v1/messages": b"msg_",
}
# routes of the Anthropic API: errors in its shape, its x-api-key credential
_ANTHROPIC_ROUTES = frozenset(("/v1/messages", "/v1/messages/count_tokens"))

# Routes the control plane answers: (path, methods, auth, prefix match).
# A data-plane process of --workers N forwards them to the control plane.
CONTROL_ROUTES = (
    ("/health", ("GET",), "none", False),
    ("/liveness", ("GET",), "none", False),
    ("/readiness", ("GET",), "none", False),
    ("/v1/models", ("GET",), "none", False),
    ("/v1/models/", ("GET",), "none", True),
    ("/get_server_info", ("GET",), "none", False),
    ("/get_model_info", ("GET",), "none", False),
    ("/health_generate", ("GET",), "none", False),
    ("/flush_cache", ("POST",), "admin", False),
    ("/get_loads", ("GET",), "admin", False),
    ("/start_profile", ("POST",), "admin", False),
    ("/stop_profile", ("POST",), "admin", False),
    ("/engine_metrics", ("GET",), "admin", False),
    ("/workers", ("GET", "POST"), "admin", False),
    ("/workers/", ("GET", "DELETE", "PATCH", "PUT"), "admin", True),
    ("/v1/responses/", ("GET", "DELETE", "POST"), "serving", True),
    ("/v1/conversations", ("POST",), "serving", False),
    ("/v1/conversations/", ("GET", "POST", "DELETE"), "serving", True),
)

TICK_SECONDS = 0.1


def policy_factory(cfg: Config, kv_events: bool = True) -> Callable[[int], Policy]:
    """`kv_events`: False in a process that routes nothing (the supervisor),
    which then does not subscribe to the workers' KV-cache events."""
    tokenizer = []      # loaded once per process, on the first cache_aware group (precise mode)

    def precise(policy: CacheAwarePolicy) -> CacheAwarePolicy:
        from smg._fast.routing_text import set_precise
        from smg.kv_events import KvEvents
        from smg.tokenizer import PrefixTokenizer, chat_renderer, load_chat_template, load_tokenizer

        if not tokenizer:
            path = cfg.tokenizer_path or cfg.model_path
            tokenizer.append(load_tokenizer(path))
            template = load_chat_template(path, cfg.chat_template)
            # chat requests are routed by the prompt their engine makes of them
            set_precise(True, chat_renderer(template, tokenizer[0]) if template is not None else None)
        policy.kv = KvEvents(PrefixTokenizer(tokenizer[0]), cfg.kv_events_port, cfg.kv_events_replay_port,
                             cfg.kv_events_port_offset, cfg.kv_events_replay_port_offset, cfg.kv_events_stale_secs,
                             cfg.kv_events_max_blocks)
        return policy

    def make(worker_type: int) -> Policy:
        name = cfg.policy_for({PREFILL: "prefill", DECODE: "decode"}.get(worker_type, "regular"))
        if name == "round_robin":
            return RoundRobinPolicy()
        if name == "random":
            return RandomPolicy()
        if name == "power_of_two":
            return PowerOfTwoPolicy()
        if name == "consistent_hashing":
            return ConsistentHashPolicy()
        if name == "least_load":
            return LeastLoadPolicy()
        if name == "passthrough":
            return PassthroughPolicy()
        if name == "bucket":
            return BucketPolicy(cfg.bucket_adjust_interval_secs, cfg.balance_abs_threshold,
                                cfg.balance_rel_threshold)
        if name == "prefix_hash":
            return PrefixHashPolicy(cfg.prefix_token_count * 4, cfg.prefix_hash_load_factor,
                                    cfg.prefix_hash_balance_abs_threshold)
        if name == "manual":
            mode = ASSIGNMENT_MODES.get(cfg.assignment_mode or "random", ASSIGNMENT_MODES["random"])
            return ManualPolicy(mode, cfg.max_idle_secs)
        if name == "cache_aware":
            policy = CacheAwarePolicy(cfg.cache_threshold, cfg.balance_abs_threshold, cfg.balance_rel_threshold,
                                      cfg.max_tree_size)
            return precise(policy) if cfg.kv_events and kv_events else policy
        raise ValueError(f"unknown policy {name!r}")

    return make


def log_startup(cfg: Config, addresses: list[str]) -> None:
    """One line saying what this gateway does, and a warning when it is open
    to anyone who can reach it."""
    static = len(cfg.worker_urls) + len(cfg.prefill) + len(cfg.decode)
    if cfg.service_discovery:
        source = "Kubernetes discovery"
    elif cfg.discovery_provider == "file":
        source = f"the manifest {cfg.discovery_file}"
    else:
        source = "the admin API (POST /workers)"
    workers = f"{static} static worker{'' if static == 1 else 's'}" + (
        f" and {source}" if static or cfg.service_discovery or cfg.discovery_provider else f"; add them with {source}")
    mode = "prefill/decode, " if cfg.pd_disaggregation else ""
    auth = "API key required" if cfg.api_key else "no API key"
    log.info("smg %s on %s | %spolicy %s | %s | %s", __version__, ", ".join(addresses), mode, cfg.policy, workers,
             auth)
    if not cfg.api_key and not is_loopback(cfg.host):
        log.warning("SECURITY: no --api-key while listening on %s: anyone who can reach it can use the workers%s. "
                    "Set --api-key (and --admin-api-key), or listen on 127.0.0.1 behind a proxy that authenticates.",
                    cfg.host, "" if cfg.admin_api_key else " and change the fleet through the admin API")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def sticky_max_idle(cfg: Config) -> float:
    """The router's sticky-session idle limit (-1: --sticky-sessions is off)."""
    return cfg.max_idle_secs if cfg.sticky_sessions else -1.0


def build_router(cfg: Config, kv_events: bool = True) -> Router:
    """The router of one process: groups made with cfg's policies, sticky
    sessions when they are on (`kv_events`: see policy_factory)."""
    return Router(policy_factory(cfg, kv_events), sticky_max_idle(cfg))


def date_header() -> bytes:
    return b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"


class DataPlane:
    """The server core with the proxied routes, the router and its
    policies. `registry` is the control plane's (one process) or a mirror
    of it (a data-plane process of --workers N)."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, router: Router, registry: Registry):
        if cfg.prometheus_duration_buckets:
            set_buckets(cfg.prometheus_duration_buckets)
        self.cfg = cfg
        self.loop = loop
        self.router = router
        self.registry = registry
        self.call_settings = CallSettings(
            router, loop,
            admission=Admission(cfg.max_concurrent_requests, cfg.queue_size, cfg.queue_timeout_secs),
            max_attempts=cfg.max_attempts,
            backoff_initial=cfg.retry_initial_backoff_ms / 1000.0,
            backoff_max=cfg.retry_max_backoff_ms / 1000.0,
            backoff_multiplier=cfg.retry_backoff_multiplier,
            backoff_jitter=cfg.retry_jitter_factor,
            request_timeout=cfg.request_timeout_secs,
            sse_keepalive=cfg.sse_keepalive_secs,
        )
        self.core = ServerCore(
            loop,
            max_payload=cfg.max_payload_size,
            header_timeout=cfg.header_read_timeout_secs,
            idle_timeout=cfg.idle_connection_timeout_secs,
            api_key=cfg.api_key,
            admin_api_key=cfg.admin_api_key,
        )
        self.core.max_connections = client_connection_limit()
        self.core.max_buffered_body = cfg.max_buffered_request_bytes
        self.core.body_stall_timeout = cfg.stream_body_stall_timeout_secs
        self.core.set_request_id_headers(cfg.request_id_headers)
        self.core.set_routing_key_headers(cfg.routing_key_headers)
        self.core.set_cors_origins(cfg.cors_allowed_origins)
        self.call_settings.model_aliases = dict(cfg.model_alias)
        self.tracer = None
        if cfg.enable_trace:
            from smg.tracing import Tracer

            self.tracer = self.call_settings.tracer = Tracer(cfg.otlp_traces_endpoint)
        self.prefill_queue: Optional[PrefillQueue] = None
        if cfg.pd_disaggregation and cfg.prefill_max_inflight_requests_per_worker > 0:
            self.prefill_queue = PrefillQueue(
                100 if cfg.prefill_queue_size is None else cfg.prefill_queue_size,
                60.0 if cfg.prefill_queue_timeout_secs is None else cfg.prefill_queue_timeout_secs)
            self.call_settings.prefill_queue = self.prefill_queue
            registry.limit_prefill(cfg.prefill_max_inflight_requests_per_worker, self.prefill_queue.worker_freed)
        self.core.date_header = date_header()
        self.servers: list[asyncio.AbstractServer] = []
        self.certificate: Optional[ServerCertificate] = None
        if cfg.tls_cert_path:
            try:
                self.certificate = ServerCertificate(cfg.tls_cert_path, cfg.tls_key_path)
            except (OSError, ssl.SSLError) as e:
                raise SystemExit(f"smg: error: --tls-cert-path/--tls-key-path do not load: {e}") from None
        self._last_slow_tick = 0.0
        self._served_at_release = 0
        self._last_eviction = monotonic()
        handler_class = PDHandler if cfg.pd_disaggregation else ProxyHandler
        for path, endpoint in ENDPOINTS.items():
            self.core.add_route(Route(path, ["POST"], native=handler_class(self.call_settings, endpoint),
                                      auth="serving", id_prefix=_ID_PREFIXES.get(path, b"req-"),
                                      errors="anthropic" if path in _ANTHROPIC_ROUTES else "openai"))

    def add_control_routes(self, handler_for: Callable[[str], Callable]) -> None:
        """Install CONTROL_ROUTES, each served by handler_for(path)."""
        for path, methods, auth, prefix in CONTROL_ROUTES:
            self.core.add_route(Route(path, list(methods), handler=handler_for(path), auth=auth), prefix=prefix)

    async def listen(self, sockets: Optional[list[socket.socket]] = None) -> None:
        """Serve on cfg.host:cfg.port, or on listening sockets made for us
        (HTTPS with --tls-cert-path)."""
        tls = self.certificate.context if self.certificate is not None else None
        if sockets is None:
            self.servers.append(await self.loop.create_server(
                self.core.protocol_factory, self.cfg.host, self.cfg.port, backlog=4096, ssl=tls))
        else:
            for sock in sockets:
                self.servers.append(await self.loop.create_server(self.core.protocol_factory, sock=sock,
                                                                  backlog=4096, ssl=tls))

    def release_memory_when_quiet(self) -> None:
        """Once requests have come and none is under way, hand the heap's
        free pages back to the system (at most once a second, never under
        load: a busy gateway always has requests under way)."""
        if self.call_settings.admission.active:
            return
        served = sum(sum(route.requests.values()) for route in self.core.all_routes())
        if served != self._served_at_release:
            self._served_at_release = served
            release_free_memory()

    def tick(self, now: float) -> None:
        self.core.tick(now)
        stop_overdue_legs(now)
        if self.prefill_queue is not None:
            self.prefill_queue.sweep(now)
        if now - self._last_slow_tick >= 1.0:
            self._last_slow_tick = now
            self.release_memory_when_quiet()
            self.core.date_header = date_header()
            if self.certificate is not None:
                self.certificate.check(now)
            for w in self.registry.all():
                w.pool.sweep(now)
        if now - self._last_eviction >= self.cfg.eviction_interval_secs:
            self._last_eviction = now
            evicted = self.router.evict_all()
            if evicted:
                log.debug("cache-aware trees: evicted %d characters", evicted)

    async def drain_requests(self) -> None:
        """Stop accepting; answer what was received, within the grace period."""
        core = self.core
        core.shutting_down = True
        for server in self.servers:
            server.close()
        core.close_idle()
        if core.active_requests:
            log.info("Finishing %d in-flight requests (grace period %.0f s)", core.active_requests,
                     self.cfg.shutdown_grace_period_secs)
        deadline = self.loop.time() + self.cfg.shutdown_grace_period_secs
        while core.active_requests and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        if core.active_requests:
            log.warning("Grace period over: dropping %d requests", core.active_requests)
        for conn in list(core.connections):
            conn.abort()
        if self.tracer is not None:
            await self.loop.run_in_executor(None, self.tracer.shutdown)  # the spans still queued


class ControlPlane:
    """The registry and everything that changes it, the routes the gateway
    answers itself, and the metrics listener. `snapshot_source` gives the
    data plane's counters for /metrics; `inflight_source`, where the data
    plane runs in other processes, their in-flight counts per worker id."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop, registry: Registry,
                 snapshot_source: SnapshotSource,
                 processes: Optional[Callable[[], list[dict]]] = None,
                 inflight_source: Optional[Callable[[], Awaitable[dict]]] = None):
        if cfg.prometheus_duration_buckets:
            set_buckets(cfg.prometheus_duration_buckets)  # the histograms' labels, with --workers N
        self.cfg = cfg
        self.loop = loop
        self.registry = registry
        self.registrar = Registrar(cfg, registry, loop)
        self.health = HealthChecker(cfg, registry, loop)
        self.metric_sources: list[Callable[[], Iterator]] = []
        self.metrics = MetricsEndpoint(GatewayCollector(registry, self.health, self.metric_sources),
                                       snapshot_source, processes)
        self.routes = GatewayRoutes(cfg, registry, lambda: self.shutting_down)
        self.admin = AdminRoutes(cfg, registry, self.registrar, inflight_source)
        self.metrics_core = ServerCore(loop, max_payload=1 << 20, header_timeout=30.0, idle_timeout=90.0)
        self.metrics_core.add_route(Route("/metrics", ["GET"], handler=self.metrics.handle))
        self.metrics_server: Optional[asyncio.AbstractServer] = None
        # --health-check-port: the probe routes on a listener of their own, so
        # that probes are answered however busy the main port is
        self.probe_core: Optional[ServerCore] = None
        self.probe_server: Optional[asyncio.AbstractServer] = None
        if cfg.health_check_port is not None:
            self.probe_core = ServerCore(loop, max_payload=1 << 16, header_timeout=30.0, idle_timeout=90.0)
            for path, handler in (("/health", self.routes.health), ("/liveness", self.routes.health),
                                  ("/readiness", self.routes.readiness)):
                self.probe_core.add_route(Route(path, ["GET"], handler=handler))
        self.discovery = None
        self.shutting_down = False
        self._last_sweep = 0.0
        self.conversations = ConversationRoutes(
            ConversationStore(cfg.history_memory_max_items, cfg.history_memory_retention_secs)
            if cfg.history_backend == "memory" else None)
        r, a, c = self.routes, self.admin, self.conversations
        self.handlers = {
            "/health": r.health, "/liveness": r.health, "/readiness": r.readiness, "/v1/models": r.models,
            "/get_server_info": r.server_info, "/get_model_info": r.model_info,
            "/health_generate": r.health_generate, "/flush_cache": r.flush_cache, "/get_loads": r.get_loads,
            "/v1/models/": r.model, "/start_profile": r.start_profile, "/stop_profile": r.stop_profile,
            "/engine_metrics": r.engine_metrics, "/v1/responses/": r.stored_response,
            "/v1/conversations": c.root, "/v1/conversations/": c.item,
            "/workers": self._workers_root, "/workers/": a.worker_route,
        }

    def _workers_root(self, req):
        if req.method == b"POST":
            return self.admin.add_worker(req)
        return self.admin.list_workers(req)

    async def start(self) -> None:
        """Metrics listener, then the workers: static ones and discovery."""
        cfg = self.cfg
        self.metrics_core.date_header = date_header()
        try:
            self.metrics_server = await self.loop.create_server(
                self.metrics_core.protocol_factory, cfg.prometheus_host, cfg.prometheus_port, backlog=128)
        except OSError as e:
            raise SystemExit(
                f"smg: error: cannot listen for metrics on {cfg.prometheus_host}:{cfg.prometheus_port}: {e}"
            ) from None
        for sock in self.metrics_server.sockets:
            log.info("metrics on http://%s/metrics", sock_address(sock))
        if self.probe_core is not None:
            self.probe_core.date_header = date_header()
            try:
                self.probe_server = await self.loop.create_server(
                    self.probe_core.protocol_factory, cfg.host, cfg.health_check_port, backlog=128)
            except OSError as e:
                raise SystemExit(f"smg: error: cannot listen for health probes on {cfg.host}:"
                                 f"{cfg.health_check_port}: {e}") from None
            for sock in self.probe_server.sockets:
                log.info("health probes (/health, /liveness, /readiness) on http://%s", sock_address(sock))
        self._add_static_workers()
        if cfg.service_discovery:
            from smg.discovery.reconcile import Discovery

            self.discovery = Discovery(self)
            self.discovery.start()
        elif cfg.discovery_provider == "file":
            from smg.discovery.files import FileDiscovery

            self.discovery = FileDiscovery(self)
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

    def tick(self, now: float) -> None:
        self.metrics_core.tick(now)
        if self.probe_core is not None:
            self.probe_core.tick(now)
        if now - self._last_sweep >= 1.0:
            self._last_sweep = now
            self.metrics_core.date_header = date_header()
            if self.probe_core is not None:
                self.probe_core.date_header = self.metrics_core.date_header
            for w in self.registry.all():
                w.control_pool.sweep(now)

    async def stop(self) -> None:
        self.shutting_down = True
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.metrics_core.close_idle()
        if self.probe_server is not None:
            self.probe_server.close()
            self.probe_core.close_idle()
        if self.discovery is not None:
            await self.discovery.stop()
        self.health.stop()
        for task in list(self.registrar.tasks.values()):
            task.cancel()
        for w in self.registry.all():
            w.pool.close()
            w.control_pool.close()


class Gateway:
    """Both planes on one event loop: one process serves everything."""

    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop):
        self.cfg = cfg
        self.loop = loop
        self.router = build_router(cfg)
        self.registry = Registry(cfg, self.router, loop)
        self.data = DataPlane(cfg, loop, self.router, self.registry)
        self.control = ControlPlane(cfg, loop, self.registry, lambda: dataplane_snapshot(self.data))
        self.data.add_control_routes(self.control.handlers.__getitem__)
        if cfg.kv_events:
            from smg.kv_events import streams_of

            self.registry.kv_event_streams = lambda: streams_of(self.router)
        self.stopping = asyncio.Event()
        self._tick_handle: Optional[asyncio.TimerHandle] = None

    async def start(self) -> None:
        await self.data.listen()
        log_startup(self.cfg, [sock_address(sock) for server in self.data.servers for sock in server.sockets])
        self._schedule_tick()
        await self.control.start()

    def _schedule_tick(self) -> None:
        self._tick_handle = self.loop.call_later(TICK_SECONDS, self._tick)

    def _tick(self) -> None:
        now = monotonic()
        try:
            self.data.tick(now)
            self.control.tick(now)
        except Exception:
            log.exception("housekeeping tick failed")
        if not self.stopping.is_set() or self.data.core.connections:
            self._schedule_tick()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("Shutdown requested")
            self.stopping.set()

    async def shutdown(self) -> None:
        self.control.shutting_down = True
        await self.data.drain_requests()
        await self.control.stop()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        log.info("smg stopped")

    async def serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop)
        if self.data.certificate is not None:
            self.loop.add_signal_handler(signal.SIGHUP, self.data.certificate.reload, "SIGHUP")
        await self.start()
        await self.stopping.wait()
        await self.shutdown()
        return 0


def sock_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_connection_limit() -> int:
    """Client connections a process can hold: each may need a worker
    connection too, and a few descriptors are the process's own."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(16, (soft - 64) // 2)


def raise_fd_limit() -> None:
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
    for notice in cfg.startup_notices:
        log.info("%s", notice)
    raise_fd_limit()
    map_large_allocations()
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
        loop = asyncio.get_running_loop()
        if cfg.workers > 1:
            from smg.supervisor import Supervisor

            return await Supervisor(cfg, loop).serve()
        return await Gateway(cfg, loop).serve()

    try:
        return uvloop.run(main())
    except OSError as e:
        logging.getLogger("smg").error("cannot start: %s", e)
        return 1
