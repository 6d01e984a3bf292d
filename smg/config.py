"""The gateway's settings: one field per command-line flag, with
the reference gateway's names and defaults."""

from __future__ import annotations

import dataclasses
from typing import Optional

POLICIES = ("cache_aware", "round_robin", "random", "power_of_two", "consistent_hashing", "manual", "least_load",
            "prefix_hash", "passthrough")
# policies only the prefill workers of PD mode may have
PREFILL_ONLY_POLICIES = ("bucket",)


@dataclasses.dataclass
class PrefillSpec:
    url: str
    bootstrap_port: Optional[int] = None


@dataclasses.dataclass
class Config:
    # server
    host: str = "0.0.0.0"
    port: int = 30000
    max_payload_size: int = 536870912
    request_timeout_secs: float = 1800.0
    header_read_timeout_secs: float = 30.0
    idle_connection_timeout_secs: float = 90.0
    shutdown_grace_period_secs: float = 180.0
    max_concurrent_requests: int = -1
    queue_size: int = 100
    queue_timeout_secs: float = 60.0
    api_key: Optional[str] = None
    admin_api_key: Optional[str] = None
    upstream_pool_idle_timeout_secs: float = 3.0
    worker_connect_timeout_secs: float = 5.0
    max_connections_per_worker: int = 0
    # data-plane processes sharing the port (1: one process serves everything)
    workers: int = 1

    # workers
    worker_urls: list[str] = dataclasses.field(default_factory=list)
    worker_startup_timeout_secs: float = 1800.0
    worker_startup_check_interval: float = 30.0
    drain_timeout_secs: float = 60.0

    # routing
    policy: str = "cache_aware"
    prefill_policy: Optional[str] = None
    decode_policy: Optional[str] = None
    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    eviction_interval_secs: float = 60.0
    max_tree_size: int = 67108864
    # precise cache_aware routing from the engines' KV-cache events (smg.kv_events)
    model_path: Optional[str] = None
    tokenizer_path: Optional[str] = None
    chat_template: Optional[str] = None
    kv_events_port: Optional[int] = None
    kv_events_replay_port: Optional[int] = None
    kv_events_port_offset: Optional[int] = None
    kv_events_replay_port_offset: Optional[int] = None
    kv_events_stale_secs: float = 5.0
    kv_events_max_blocks: int = 1048576

    # prefill/decode disaggregation
    pd_disaggregation: bool = False
    prefill: list[PrefillSpec] = dataclasses.field(default_factory=list)
    decode: list[str] = dataclasses.field(default_factory=list)
    # prefill admission: at most this many requests in flight per prefill
    # worker (<= 0: no limit), then a queue (default 100 deep, 60 s)
    prefill_max_inflight_requests_per_worker: int = -1
    prefill_queue_size: Optional[int] = None
    prefill_queue_timeout_secs: Optional[float] = None

    # Kubernetes service discovery
    service_discovery: bool = False
    # OpenTelemetry: a span per proxied request, over OTLP
    enable_trace: bool = False
    otlp_traces_endpoint: str = "localhost:4317"
    # TLS: HTTPS on the main port; to https:// workers, CAs and a client certificate (mTLS)
    tls_cert_path: Optional[str] = None
    tls_key_path: Optional[str] = None
    client_cert_path: Optional[str] = None
    client_key_path: Optional[str] = None
    ca_cert_paths: list[str] = dataclasses.field(default_factory=list)
    # --discovery-provider file: the workers a JSON manifest lists
    discovery_provider: Optional[str] = None
    discovery_file: Optional[str] = None
    discovery_check_interval_secs: float = 30.0
    selector: list[str] = dataclasses.field(default_factory=list)
    service_discovery_namespace: Optional[str] = None
    service_discovery_port: int = 80
    prefill_selector: list[str] = dataclasses.field(default_factory=list)
    decode_selector: list[str] = dataclasses.field(default_factory=list)
    model_id_from: Optional[str] = None
    bootstrap_port_annotation: str = "sglang.ai/bootstrap-port"
    worker_ports_annotation: str = "smg.ai/worker-ports"

    # health checks
    health_check_interval_secs: float = 60.0
    health_check_timeout_secs: float = 5.0
    health_failure_threshold: int = 3
    health_success_threshold: int = 2
    health_check_endpoint: str = "/health"
    disable_health_check: bool = False
    remove_unhealthy_workers: bool = False

    # circuit breaker
    cb_failure_threshold: int = 10
    cb_success_threshold: int = 3
    cb_timeout_duration_secs: float = 60.0
    cb_window_duration_secs: float = 120.0
    disable_circuit_breaker: bool = False

    # retries
    retry_max_retries: int = 5
    retry_initial_backoff_ms: float = 50.0
    retry_max_backoff_ms: float = 30000.0
    retry_backoff_multiplier: float = 1.5
    retry_jitter_factor: float = 0.2
    disable_retries: bool = False

    # observability
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = 29000
    log_level: str = "info"
    log_json: bool = False
    log_dir: Optional[str] = None

    # seconds of upstream silence before an SSE stream gets a keep-alive comment (0: never)
    sse_keepalive_secs: float = 15.0

    # origins browsers may call the gateway from ("*": any; empty: no CORS)
    cors_allowed_origins: list[str] = dataclasses.field(default_factory=list)

    # headers the routing key is taken from, in order (empty: X-SMG-Routing-Key)
    routing_key_headers: list[str] = dataclasses.field(default_factory=list)

    # headers a client's request id is taken from, in order (empty: the defaults)
    request_id_headers: list[str] = dataclasses.field(default_factory=list)

    # a listener of its own for /health, /liveness and /readiness
    health_check_port: Optional[int] = None

    # grace period before a new worker's first health check
    worker_startup_delay: float = 0.0

    # upper bounds of the duration histograms (empty: the reference's defaults)
    prometheus_duration_buckets: list[float] = dataclasses.field(default_factory=list)

    # --model-alias ALIAS=MODEL: a client-facing name for a served model
    model_alias: dict[str, str] = dataclasses.field(default_factory=dict)

    # the prefix_hash policy
    prefix_token_count: int = 256
    prefix_hash_load_factor: float = 1.25
    prefix_hash_balance_abs_threshold: float = 10.0

    # the manual policy (sticky routing keys)
    assignment_mode: Optional[str] = None
    max_idle_secs: float = 14400.0
    bucket_adjust_interval_secs: float = 5.0
    sticky_sessions: bool = False
    dp_aware: bool = False
    # a request body larger than this streams to the worker when the gateway
    # need not read it; a streamed body idle this long is given up (0: never)
    max_buffered_request_bytes: int = 1 << 20
    stream_body_stall_timeout_secs: float = 300.0
    # /v1/conversations: "memory" (kept in the control plane) or "none"
    history_backend: str = "memory"
    history_memory_max_items: int = 100_000
    history_memory_retention_secs: float = 86400.0

    # lines logged at start-up about reference flags accepted with no effect
    startup_notices: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_attempts(self) -> int:
        return 1 if self.disable_retries else max(1, self.retry_max_retries)

    @property
    def kv_events(self) -> bool:
        """Precise routing: cache_aware reads the workers' KV-cache events."""
        return self.kv_events_port is not None or self.kv_events_port_offset is not None

    def policy_for(self, worker_type: str) -> str:
        if worker_type == "prefill" and self.prefill_policy:
            return self.prefill_policy
        if worker_type == "decode" and self.decode_policy:
            return self.decode_policy
        return self.policy
