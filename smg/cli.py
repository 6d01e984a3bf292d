"""The `smg` command: flags compatible with the reference gateway.

    smg --worker-urls http://w1:8000 http://w2:8000
    smg launch --worker-urls ...        # the reference's spelling, also accepted

Invalid flags or combinations exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import math
import sys
from typing import NoReturn, Optional, Sequence

from smg import __version__
from smg.config import POLICIES, PREFILL_ONLY_POLICIES, Config, PrefillSpec
from smg.reference_flags import all_groups

# the reference's policies that smg does not have yet (accepted by the
# parser so that the error names them, instead of an argparse choice error)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one clear line, exit status 2
        self.exit(2, f"smg: error: {message}\n")


def _parse(value: str, convert, what: str):
    """value as a number, or argparse's error naming what was expected (never the Python type)."""
    try:
        return convert(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def _int(value: str) -> int:
    return _parse(value, int, "an integer")


def _positive_int(value: str) -> int:
    n = _parse(value, int, "a positive integer")
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _non_negative_int(value: str) -> int:
    n = _parse(value, int, "a non-negative integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return n


def _port(value: str) -> int:
    n = _parse(value, int, "a port number 0-65535")
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {value!r}")
    return n


def _non_negative_float(value: str) -> float:
    f = _parse(value, float, "a finite number >= 0")
    if not math.isfinite(f) or f < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {value!r}")
    return f


def _positive_float(value: str) -> float:
    f = _parse(value, float, "a finite number > 0")
    if not math.isfinite(f) or f <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return f


def _process_count(value: str) -> int:
    if value == "auto":
        from smg.supervisor import available_cpus

        return available_cpus()
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of processes (1 or more) or 'auto', got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = _Parser(
        prog="smg",
        description="smg: a fast model gateway for SGLang and vLLM workers (compatible with the Rust SMG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,
    )
    s = p.add_argument_group("server")
    s.add_argument("--host", default=d.host)
    s.add_argument("--port", type=_port, default=d.port)
    s.add_argument("--max-payload-size", type=_positive_int, default=d.max_payload_size,
                   help="largest request body in bytes; larger ones get 413")
    s.add_argument("--max-buffered-request-bytes", type=_non_negative_int, default=d.max_buffered_request_bytes,
                   help="a larger request body streams to the worker as it arrives (not validated by the gateway, "
                        "not retried) when the gateway need not read it: one model, a policy that does not route "
                        "by text (not cache_aware, prefix_hash, bucket), no --model-alias, no PD")
    s.add_argument("--stream-body-stall-timeout-secs", type=_non_negative_float,
                   default=d.stream_body_stall_timeout_secs,
                   help="a streamed request body that stops arriving this long is given up with 408 (0: never)")
    s.add_argument("--request-timeout-secs", type=_positive_float, default=d.request_timeout_secs)
    s.add_argument("--header-read-timeout-secs", type=_non_negative_float, default=d.header_read_timeout_secs,
                   help="time a client has to send a request's headers (0 disables)")
    s.add_argument("--idle-connection-timeout-secs", type=_non_negative_float,
                   default=d.idle_connection_timeout_secs, help="close keep-alive connections idle this long (0 disables)")
    s.add_argument("--shutdown-grace-period-secs", type=_non_negative_float, default=d.shutdown_grace_period_secs)
    s.add_argument("--max-concurrent-requests", type=_int, default=d.max_concurrent_requests,
                   help="proxied requests served at once (-1 or 0: unlimited)")
    s.add_argument("--queue-size", type=_non_negative_int, default=d.queue_size,
                   help="requests waiting for a slot when --max-concurrent-requests is reached")
    s.add_argument("--queue-timeout-secs", type=_positive_float, default=d.queue_timeout_secs)
    s.add_argument("--sse-keepalive-secs", type=_non_negative_float, default=d.sse_keepalive_secs,
                   help="seconds of upstream silence after which an event stream gets a keep-alive comment "
                        "(0: never)")
    s.add_argument("--cors-allowed-origins", nargs="*", action="extend", default=[], metavar="ORIGIN",
                   help="origins a browser may call the gateway from, or '*' alone for any (default: none)")
    s.add_argument("--routing-key-headers", nargs="*", action="extend", default=[], metavar="HEADER",
                   help="headers the routing key (manual, consistent_hashing) is taken from, in order "
                        "(default: X-SMG-Routing-Key)")
    s.add_argument("--request-id-headers", nargs="*", action="extend", default=[], metavar="HEADER",
                   help="headers a client's request id is taken from, in order (default: x-request-id, "
                        "x-correlation-id, x-trace-id, request-id)")
    s.add_argument("--api-key", default=None, help="serving routes require 'Authorization: Bearer <key>'")
    s.add_argument("--admin-api-key", default=None, help="key for the admin routes (default: --api-key)")
    s.add_argument("--workers", type=_process_count, default=d.workers, metavar="N|auto",
                   help="data-plane processes sharing the port under one control plane; "
                        "'auto': the CPUs this process may use (cgroup CPU quota included)")
    s.add_argument("--upstream-pool-idle-timeout-secs", type=_non_negative_float,
                   default=d.upstream_pool_idle_timeout_secs, help="close idle worker connections after this long")

    w = p.add_argument_group("workers")
    w.add_argument("--worker-urls", nargs="*", action="extend", default=[], metavar="URL",
                   help="workers to register at start-up (repeatable; values accumulate)")
    w.add_argument("--worker-startup-timeout-secs", type=_positive_float, default=d.worker_startup_timeout_secs)
    w.add_argument("--worker-startup-delay", type=_non_negative_float, default=d.worker_startup_delay,
                   help="grace period in seconds before a new worker's first startup check")
    w.add_argument("--worker-startup-check-interval", type=_positive_float, default=d.worker_startup_check_interval)
    w.add_argument("--worker-connect-timeout-secs", type=_positive_float, default=d.worker_connect_timeout_secs,
                   help="give up connecting to a worker after this long (the request is retried elsewhere)")
    w.add_argument("--max-connections-per-worker", type=_non_negative_int, default=d.max_connections_per_worker,
                   help="open connections to one worker at most (0: no cap); requests beyond wait for one")
    w.add_argument("--drain-timeout-secs", type=_non_negative_float, default=d.drain_timeout_secs,
                   help="longest wait for a removed worker's in-flight requests")

    r = p.add_argument_group("routing")
    r.add_argument("--policy", choices=POLICIES, default=d.policy, metavar="POLICY",
                   help=f"one of {', '.join(POLICIES)}")
    r.add_argument("--prefill-policy", choices=POLICIES + PREFILL_ONLY_POLICIES, default=None,
                   metavar="POLICY", help="the prefill workers' policy in PD mode (default: --policy); "
                                          "bucket: by prompt length")
    r.add_argument("--decode-policy", choices=POLICIES, default=None, metavar="POLICY",
                   help="the decode workers' policy in PD mode (default: --policy)")
    r.add_argument("--bucket-adjust-interval-secs", type=_positive_float, default=d.bucket_adjust_interval_secs,
                   help="bucket policy: how often the length boundaries are recomputed")
    r.add_argument("--cache-threshold", "--cache-match-threshold", type=_non_negative_float, default=d.cache_threshold)
    r.add_argument("--balance-abs-threshold", "--spill-abs-threshold", type=_non_negative_int, default=d.balance_abs_threshold)
    r.add_argument("--balance-rel-threshold", "--spill-rel-threshold", type=_non_negative_float, default=d.balance_rel_threshold)
    r.add_argument("--model-alias", action="append", default=[], metavar="ALIAS=MODEL",
                   help="accept ALIAS as the name of the served MODEL (repeatable; the workers get MODEL)")
    r.add_argument("--prefix-token-count", type=_positive_int, default=d.prefix_token_count,
                   help="prefix_hash: tokens of the prefix hashed (four characters a token: smg routes by text)")
    r.add_argument("--prefix-hash-load-factor", type=_positive_float, default=d.prefix_hash_load_factor,
                   help="prefix_hash: a worker above this multiple of the mean load is passed over")
    r.add_argument("--prefix-hash-balance-abs-threshold", type=_non_negative_float,
                   default=d.prefix_hash_balance_abs_threshold,
                   help="prefix_hash: ... and above the mean by more than this many requests")
    r.add_argument("--assignment-mode", choices=("random", "min_load", "min_group", "delegate"), default=None,
                   help="manual policy: how a new routing key gets its worker (random, min_load: fewest in flight, "
                        "min_group: fewest keys; delegate is random here) (default: random)")
    r.add_argument("--max-idle-secs", "--sticky-key-idle-secs", type=_positive_float, default=d.max_idle_secs,
                   help="manual policy and --sticky-sessions: forget routing keys unused this long")
    r.add_argument("--dp-aware", action="store_true",
                   help="route to each data-parallel rank of a worker (dp_size from its server info) as a worker of "
                        "its own, naming the rank in the request (data_parallel_rank)")
    r.add_argument("--sticky-sessions", "--routing-key-override", dest="sticky_sessions", action="store_true",
                   help="on any policy, keep a session on the worker its first request went to: the session is "
                        "the routing key (X-SMG-Routing-Key, --routing-key-headers), else the client's request id")
    r.add_argument("--eviction-interval-secs", type=_positive_float, default=d.eviction_interval_secs)
    r.add_argument("--max-tree-size", type=_positive_int, default=d.max_tree_size)

    kv = p.add_argument_group("precise routing from the engines' KV-cache events (cache_aware; pip install "
                              "'smg[kv-events]')")
    kv.add_argument("--kv-events-port", type=_port, default=None, metavar="PORT",
                    help="subscribe to each worker's KV-cache events (ZeroMQ) on this port of its host, plus its "
                         "data-parallel rank (SGLang/vLLM --kv-events-config endpoint tcp://*:PORT); cache_aware "
                         "then routes by the blocks each engine reports holding. Needs --tokenizer-path or "
                         "--model-path")
    kv.add_argument("--kv-events-replay-port", type=_port, default=None, metavar="PORT",
                    help="the engines' replay socket (replay_endpoint), asked for the batches a sequence gap lost")
    kv.add_argument("--kv-events-port-offset", type=_int, default=None, metavar="N",
                    help="instead of --kv-events-port: each worker's publisher is on its own HTTP port + N "
                         "(several engines on one host)")
    kv.add_argument("--kv-events-replay-port-offset", type=_int, default=None, metavar="N",
                    help="with --kv-events-port-offset: each worker's replay socket is on its HTTP port + N")
    kv.add_argument("--kv-events-stale-secs", type=_positive_float, default=d.kv_events_stale_secs,
                    help="a worker with no event this long after a request that stores blocks is routed by the "
                         "character tree until its events resume")
    kv.add_argument("--kv-events-max-blocks", type=_positive_int, default=d.kv_events_max_blocks,
                    help="blocks indexed per worker at most (a worker over it is routed by the character tree "
                         "until its engine clears its cache)")
    kv.add_argument("--model-path", "--model", dest="model_path", default=None, metavar="PATH",
                    help="a local model directory: its tokenizer.json tokenizes prompts for --kv-events-port")
    kv.add_argument("--tokenizer-path", default=None, metavar="PATH",
                    help="a local tokenizer.json, or a directory holding one (overrides --model-path)")
    kv.add_argument("--chat-template", default=None, metavar="PATH",
                    help="a Jinja chat template file, instead of the one the model ships (chat requests are "
                         "routed by the prompt it makes)")

    h = p.add_argument_group("conversations (/v1/conversations)")
    h.add_argument("--history-backend", default=d.history_backend, metavar="BACKEND",
                   help="memory: conversations kept in the gateway's memory; none: not stored "
                        "(oracle, postgres, redis: not supported)")
    h.add_argument("--history-memory-max-items", type=_positive_int, default=d.history_memory_max_items,
                   help="conversation items kept at most (the least recently used conversations go first)")
    h.add_argument("--history-memory-retention-secs", type=_positive_float,
                   default=d.history_memory_retention_secs, help="a conversation unused this long is dropped")

    pd = p.add_argument_group("prefill/decode disaggregation")
    pd.add_argument("--pd-disaggregation", action="store_true")
    pd.add_argument("--prefill", nargs="+", action="append", default=[], metavar="URL [BOOTSTRAP_PORT|none]")
    pd.add_argument("--decode", action="append", default=[], metavar="URL")
    pd.add_argument("--prefill-max-inflight-requests-per-worker", type=_int,
                    default=d.prefill_max_inflight_requests_per_worker, metavar="N",
                    help="a prefill worker with N requests in flight takes no more; the next wait in the prefill "
                         "queue (<= 0: no limit)")
    pd.add_argument("--prefill-queue-size", type=_non_negative_int, default=None, metavar="N",
                    help="requests that may wait for a prefill worker (default 100 with a limit; 0: none wait)")
    pd.add_argument("--prefill-queue-timeout-secs", type=_positive_float, default=None, metavar="SECS",
                    help="longest wait for a prefill worker (default 60 with a limit)")

    o2 = p.add_argument_group("tracing")
    o2.add_argument("--enable-trace", action="store_true",
                    help="export a span per proxied request over OTLP (W3C traceparent honoured and passed on)")
    o2.add_argument("--otlp-traces-endpoint", default=d.otlp_traces_endpoint, metavar="HOST:PORT|URL",
                    help="the OTLP collector: host:port over gRPC, or an http(s):// URL over HTTP")

    t = p.add_argument_group("TLS")
    t.add_argument("--tls-cert-path", default=None, metavar="PEM",
                   help="serve HTTPS on --port with this certificate (chain); reloaded on SIGHUP or when it changes")
    t.add_argument("--tls-key-path", default=None, metavar="PEM", help="the private key of --tls-cert-path")
    t.add_argument("--client-cert-path", default=None, metavar="PEM",
                   help="the certificate smg presents to https:// workers that ask for one (mTLS)")
    t.add_argument("--client-key-path", default=None, metavar="PEM", help="the private key of --client-cert-path")
    t.add_argument("--ca-cert-paths", nargs="*", action="extend", default=[], metavar="PEM",
                   help="CA certificates (files or directories) that https:// workers' certificates must chain to "
                        "(default: the system's)")

    f = p.add_argument_group("file discovery")
    f.add_argument("--discovery-provider", choices=("kubernetes", "file"), default=None,
                   help="kubernetes: the same as --service-discovery; file: the workers --discovery-file lists")
    f.add_argument("--discovery-file", default=None, metavar="PATH",
                   help='JSON manifest {"version": 1, "workers": [{"url": ...}, ...]}; it may appear after start-up')
    f.add_argument("--discovery-check-interval-secs", type=_positive_float, default=d.discovery_check_interval_secs,
                   help="reread the manifest this often (it is also reread within a second of changing)")

    k = p.add_argument_group("Kubernetes service discovery")
    k.add_argument("--service-discovery", action="store_true")
    k.add_argument("--selector", nargs="+", action="extend", default=[], metavar="SELECTOR")
    k.add_argument("--service-discovery-namespace", default=None)
    k.add_argument("--service-discovery-port", type=_port, default=d.service_discovery_port)
    k.add_argument("--prefill-selector", nargs="+", action="extend", default=[], metavar="SELECTOR")
    k.add_argument("--decode-selector", nargs="+", action="extend", default=[], metavar="SELECTOR")
    k.add_argument("--model-id-from", default=None, metavar="namespace|label:KEY|annotation:KEY")
    k.add_argument("--bootstrap-port-annotation", default=d.bootstrap_port_annotation)
    k.add_argument("--worker-ports-annotation", default=d.worker_ports_annotation)

    h = p.add_argument_group("health checks")
    h.add_argument("--health-check-interval-secs", type=_positive_float, default=d.health_check_interval_secs)
    h.add_argument("--health-check-timeout-secs", type=_positive_float, default=d.health_check_timeout_secs)
    h.add_argument("--health-failure-threshold", type=_positive_int, default=d.health_failure_threshold)
    h.add_argument("--health-success-threshold", type=_positive_int, default=d.health_success_threshold)
    h.add_argument("--health-check-endpoint", default=d.health_check_endpoint)
    h.add_argument("--disable-health-check", action="store_true")
    h.add_argument("--health-check-port", type=_port, default=None,
                   help="also answer /health, /liveness and /readiness on this port, on a listener of its own")
    recovery = h.add_mutually_exclusive_group()
    recovery.add_argument("--remove-unhealthy-workers", "--worker-auto-recovery", dest="remove_unhealthy_workers",
                          action="store_const", const=True, default=None,
                          help="remove workers that keep failing health checks (default: on with "
                               "--service-discovery, which registers them again when they recover; off otherwise)")
    recovery.add_argument("--no-remove-unhealthy-workers", "--no-worker-auto-recovery",
                          dest="remove_unhealthy_workers", action="store_const", const=False)

    c = p.add_argument_group("circuit breaker")
    c.add_argument("--cb-failure-threshold", type=_positive_int, default=d.cb_failure_threshold)
    c.add_argument("--cb-success-threshold", type=_positive_int, default=d.cb_success_threshold)
    c.add_argument("--cb-timeout-duration-secs", type=_non_negative_float, default=d.cb_timeout_duration_secs)
    c.add_argument("--cb-window-duration-secs", type=_non_negative_float, default=d.cb_window_duration_secs)
    c.add_argument("--disable-circuit-breaker", action="store_true")

    rt = p.add_argument_group("retries")
    rt.add_argument("--retry-max-retries", type=_positive_int, default=d.retry_max_retries,
                    help="attempts per request, the first one included")
    rt.add_argument("--retry-initial-backoff-ms", type=_non_negative_float, default=d.retry_initial_backoff_ms)
    rt.add_argument("--retry-max-backoff-ms", type=_non_negative_float, default=d.retry_max_backoff_ms)
    rt.add_argument("--retry-backoff-multiplier", type=_non_negative_float, default=d.retry_backoff_multiplier)
    rt.add_argument("--retry-jitter-factor", type=_non_negative_float, default=d.retry_jitter_factor)
    rt.add_argument("--disable-retries", action="store_true")

    o = p.add_argument_group("observability")
    o.add_argument("--prometheus-host", default=d.prometheus_host)
    o.add_argument("--prometheus-port", type=_port, default=d.prometheus_port)
    o.add_argument("--prometheus-duration-buckets", nargs="+", type=_positive_float, default=[], metavar="SECS",
                   help="upper bounds of the request-duration histograms, at most 29 (default: the reference's)")
    o.add_argument("--log-level", choices=("debug", "info", "warn", "warning", "error"), default=d.log_level)
    o.add_argument("--log-json", action="store_true")
    o.add_argument("--log-dir", default=None)
    _add_reference_flags(p)
    p.add_argument("--version", "-V", action="version", version=f"smg {__version__}",
                   help="print the version and exit")
    for action in p._actions:
        if action.help is None and action.option_strings:
            action.help = HELP[action.option_strings[0]]
    return p


# the flags whose help is not given where they are added
HELP = {
    "--host": "address to listen on (0.0.0.0: every IPv4 address; :: for IPv6 too)",
    "--port": "port of the gateway (proxied routes, the admin API, probes)",
    "--request-timeout-secs": "longest a proxied request may take, retries included (then 504)",
    "--shutdown-grace-period-secs": "on SIGTERM, how long in-flight requests may take to finish",
    "--queue-timeout-secs": "longest a request waits in the admission queue (then 429)",
    "--worker-startup-timeout-secs": "how long a new worker may take to become healthy before it is given up",
    "--worker-startup-check-interval": "seconds between health probes of a worker being registered",
    "--cache-threshold": "cache_aware: the prefix match (0-1) above which a request goes to the worker that has it",
    "--balance-abs-threshold": "cache_aware: in-flight difference above which load beats cache affinity ...",
    "--balance-rel-threshold": "cache_aware: ... together with this ratio of the busiest to the least busy worker",
    "--eviction-interval-secs": "cache_aware: seconds between trims of the prefix trees to --max-tree-size",
    "--max-tree-size": "cache_aware: characters each model's prefix tree keeps",
    "--pd-disaggregation": "prefill/decode disaggregation: each request goes to a prefill and a decode worker",
    "--prefill": "a prefill worker: URL and optional bootstrap port (or none); repeatable",
    "--decode": "a decode worker URL; repeatable",
    "--service-discovery": "find workers among Kubernetes pods matching --selector",
    "--selector": "label selector(s) of worker pods, key=value (repeatable; all must match)",
    "--service-discovery-namespace": "namespace to watch (default: all the service account may list)",
    "--service-discovery-port": "the workers' port in discovered pods",
    "--prefill-selector": "PD discovery: label selector(s) of prefill pods",
    "--decode-selector": "PD discovery: label selector(s) of decode pods",
    "--model-id-from": "where a discovered pod's model id comes from (default: the worker's own model info)",
    "--bootstrap-port-annotation": "pod annotation holding a prefill pod's bootstrap port",
    "--worker-ports-annotation": "pod annotation listing several worker ports of one pod (comma-separated)",
    "--health-check-interval-secs": "seconds between health checks of a registered worker",
    "--health-check-timeout-secs": "a health check not answered this long fails",
    "--health-failure-threshold": "consecutive failed checks that make a worker not ready",
    "--health-success-threshold": "consecutive passed checks that make it ready again",
    "--health-check-endpoint": "the workers' health path",
    "--disable-health-check": "no periodic health checks (a worker stays as registration left it)",
    "--no-remove-unhealthy-workers": "keep workers that keep failing health checks (see --remove-unhealthy-workers)",
    "--cb-failure-threshold": "circuit breaker: consecutive failures that open it",
    "--cb-success-threshold": "circuit breaker: successes in half-open that close it",
    "--cb-timeout-duration-secs": "circuit breaker: how long it stays open before a trial request",
    "--cb-window-duration-secs": "circuit breaker: failures count only within this long of the first of them",
    "--disable-circuit-breaker": "never stop routing to a worker because of its failures",
    "--retry-initial-backoff-ms": "the first retry's backoff",
    "--retry-max-backoff-ms": "the longest backoff between retries",
    "--retry-backoff-multiplier": "backoff growth per retry",
    "--retry-jitter-factor": "random share (0-1) of each backoff",
    "--disable-retries": "send each request once",
    "--prometheus-host": "address of the metrics listener (GET /metrics)",
    "--prometheus-port": "port of the metrics listener",
    "--log-level": "debug, info, warn or error (RUST_LOG-style filters such as smg::discovery=debug work too)",
    "--log-json": "one JSON object per log line",
    "--log-dir": "also write the log to a daily file in this directory",
}


def _flag_dest(name: str) -> str:
    return "ref_" + name.lstrip("-").replace("-", "_")


def _add_reference_flags(p: argparse.ArgumentParser) -> None:
    """The reference's flags smg does not implement: parsed with the
    reference's arity, then refused (or accepted as no-ops) by
    check_reference_flags."""
    no_effect = p.add_argument_group("reference flags accepted with no effect")
    for kind, group in all_groups():
        target = no_effect if kind == "no effect" else p
        for names, nargs in group.flags:
            help_text = f"no effect: {group.feature}" if kind == "no effect" else argparse.SUPPRESS
            kwargs = {"dest": _flag_dest(names[0]), "default": None, "help": help_text}
            if nargs == 0:
                target.add_argument(*names, action="store_const", const=True, **kwargs)
            elif nargs == 1:
                target.add_argument(*names, action="append", **kwargs)
            else:
                target.add_argument(*names, nargs=nargs, action="extend", **kwargs)


def check_reference_flags(values: dict) -> list[str]:
    """Pop the reference-only flags from `values`; raise ValueError naming
    the first one given whose feature smg lacks; return the notices for the
    accepted no-op flags."""
    notices = []
    for kind, group in all_groups():
        for names, _ in group.flags:
            given = values.pop(_flag_dest(names[0]), None)
            if given is None:
                continue
            if kind == "no effect":
                allowed = (group.accepted or {}).get(names[0])
                bad = [v for v in (given if isinstance(given, list) else []) if allowed and v not in allowed]
                if not bad:
                    notices.append(f"{names[0]} has no effect: {group.feature}")
                    continue
                raise ValueError(f"{names[0]} {bad[0]}: not supported (smg accepts {', '.join(allowed)})")
            raise ValueError(f"{names[0]}: {kind}: {group.feature}")
    return notices


def _parse_prefill(items: list[list[str]]) -> list[PrefillSpec]:
    out = []
    for item in items:
        if len(item) > 2:
            raise ValueError(f"--prefill takes URL [BOOTSTRAP_PORT|none], got {' '.join(item)!r}")
        port: Optional[int] = None
        if len(item) == 2 and item[1].lower() != "none":
            if not item[1].isdigit() or not 0 < int(item[1]) < 65536:
                raise ValueError(f"--prefill {item[0]}: bootstrap port must be 1-65535 or 'none', got {item[1]!r}")
            port = int(item[1])
        out.append(PrefillSpec(item[0], port))
    return out


def _parse_aliases(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        alias, sep, model = item.partition("=")
        if not sep or not alias.strip() or not model.strip():
            raise ValueError(f"--model-alias takes ALIAS=MODEL, got {item!r}")
        if alias.strip() in out and out[alias.strip()] != model.strip():
            raise ValueError(f"--model-alias {alias.strip()!r} is given for two models")
        out[alias.strip()] = model.strip()
    return out


def config_from_args(argv: Optional[Sequence[str]] = None) -> Config:
    """Parse and validate; exits with status 2 on any error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = vars(args)
    try:
        notices = check_reference_flags(values)
        values["model_alias"] = _parse_aliases(values["model_alias"])
        values["prefill"] = _parse_prefill(values["prefill"])
        if values["log_level"] == "warning":
            values["log_level"] = "warn"
        if values["discovery_provider"] is not None and values["service_discovery"]:
            raise ValueError("give --discovery-provider or --service-discovery, not both")
        if values["discovery_provider"] == "kubernetes":
            values["service_discovery"] = True
        if values["remove_unhealthy_workers"] is None:
            # discovery adds a removed worker back once it is healthy again
            values["remove_unhealthy_workers"] = values["service_discovery"] or values["discovery_provider"] == "file"
        cfg = Config(**values)
        if (cfg.model_path or cfg.tokenizer_path or cfg.chat_template) and not cfg.kv_events:
            notices.append("--model-path/--tokenizer-path/--chat-template have no effect without --kv-events-port "
                           "(smg routes by the request text; the workers tokenize)")
        cfg.startup_notices = notices
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg


def validate(cfg: Config) -> None:
    """Checks that need more than one flag, or the worker modules."""
    from smg._fast.worker import split_url

    if cfg.history_backend not in ("memory", "none"):
        raise ValueError(f"--history-backend {cfg.history_backend}: not supported (smg has memory, none)")
    for url in cfg.worker_urls + cfg.decode + [p.url for p in cfg.prefill]:
        split_url(url)
    if cfg.cache_threshold > 1.0:
        raise ValueError(f"--cache-threshold must be between 0 and 1, got {cfg.cache_threshold}")
    if cfg.balance_rel_threshold < 1.0:
        raise ValueError(f"--balance-rel-threshold must be at least 1.0, got {cfg.balance_rel_threshold}")
    if cfg.retry_max_backoff_ms < cfg.retry_initial_backoff_ms:
        raise ValueError("--retry-max-backoff-ms must not be below --retry-initial-backoff-ms")
    if not cfg.health_check_endpoint.startswith("/"):
        raise ValueError(f"--health-check-endpoint must start with '/', got {cfg.health_check_endpoint!r}")
    if not cfg.pd_disaggregation and (cfg.prefill or cfg.decode):
        raise ValueError("--prefill and --decode need --pd-disaggregation")
    if cfg.pd_disaggregation and cfg.worker_urls:
        raise ValueError("--worker-urls cannot be used with --pd-disaggregation; use --prefill and --decode")
    if cfg.prometheus_port == cfg.port and cfg.port != 0:
        raise ValueError(f"--prometheus-port must differ from --port ({cfg.port})")
    if len(cfg.prometheus_duration_buckets) > 29:
        raise ValueError(f"--prometheus-duration-buckets takes at most 29 bounds, got "
                         f"{len(cfg.prometheus_duration_buckets)}")
    if cfg.prefix_hash_load_factor < 1.0:
        raise ValueError(f"--prefix-hash-load-factor must be at least 1.0, got {cfg.prefix_hash_load_factor}")
    if "*" in cfg.cors_allowed_origins and len(cfg.cors_allowed_origins) > 1:
        raise ValueError("--cors-allowed-origins: '*' stands alone (any origin), not with other origins")
    for origin in cfg.cors_allowed_origins:
        if origin != "*" and not (origin.startswith("http://") or origin.startswith("https://")):
            raise ValueError(f"--cors-allowed-origins: {origin!r} is not an origin (http[s]://host[:port])")
    if cfg.health_check_port is not None and cfg.health_check_port != 0 \
            and cfg.health_check_port in (cfg.port, cfg.prometheus_port):
        raise ValueError("--health-check-port must differ from --port and --prometheus-port")
    if cfg.service_discovery:
        from smg._fast.selector import parse_selector_items

        if cfg.pd_disaggregation:
            if not cfg.prefill_selector or not cfg.decode_selector:
                raise ValueError("--service-discovery with --pd-disaggregation needs --prefill-selector and --decode-selector")
            parse_selector_items(cfg.prefill_selector, "--prefill-selector")
            parse_selector_items(cfg.decode_selector, "--decode-selector")
        else:
            if not cfg.selector:
                raise ValueError("--service-discovery needs --selector (e.g. --selector app=sglang-worker)")
            parse_selector_items(cfg.selector, "--selector")
        if cfg.model_id_from is not None:
            src = cfg.model_id_from
            if not (src == "namespace" or (src.startswith("label:") and len(src) > 6)
                    or (src.startswith("annotation:") and len(src) > 11)):
                raise ValueError(f"--model-id-from must be namespace, label:<key> or annotation:<key>, got {src!r}")
    elif cfg.selector or cfg.prefill_selector or cfg.decode_selector:
        raise ValueError("--selector, --prefill-selector and --decode-selector need --service-discovery")
    if cfg.enable_trace:
        import importlib.util

        for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc",
                       "opentelemetry.exporter.otlp.proto.http"):
            try:
                found = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                raise ValueError("--enable-trace needs the OpenTelemetry SDK and exporters: "
                                 "pip install 'smg[tracing]'")
    if bool(cfg.tls_cert_path) != bool(cfg.tls_key_path):
        raise ValueError("--tls-cert-path and --tls-key-path go together")
    if bool(cfg.client_cert_path) != bool(cfg.client_key_path):
        raise ValueError("--client-cert-path and --client-key-path go together")
    for flag, path in (("--tls-cert-path", cfg.tls_cert_path), ("--tls-key-path", cfg.tls_key_path),
                       ("--client-cert-path", cfg.client_cert_path), ("--client-key-path", cfg.client_key_path),
                       *(("--ca-cert-paths", p) for p in cfg.ca_cert_paths)):
        if path and not os.path.exists(path):
            raise ValueError(f"{flag} {path}: no such file")
    if cfg.kv_events_port is not None and cfg.kv_events_port_offset is not None:
        raise ValueError("give --kv-events-port or --kv-events-port-offset, not both")
    if cfg.kv_events_replay_port_offset is not None and cfg.kv_events_port_offset is None:
        raise ValueError("--kv-events-replay-port-offset needs --kv-events-port-offset")
    if cfg.kv_events_replay_port is not None and cfg.kv_events_port is None:
        raise ValueError("--kv-events-replay-port needs --kv-events-port")
    if cfg.kv_events:
        _check_kv_events(cfg)
    if cfg.discovery_provider == "file" and not cfg.discovery_file:
        raise ValueError("--discovery-provider file needs --discovery-file PATH")
    if cfg.discovery_file and cfg.discovery_provider != "file":
        raise ValueError("--discovery-file needs --discovery-provider file")


def _check_kv_events(cfg: Config) -> None:
    import importlib.util

    from smg.tokenizer import tokenizer_file

    sides = ("prefill", "decode") if cfg.pd_disaggregation else ("regular",)
    if not any(cfg.policy_for(side) == "cache_aware" for side in sides):
        raise ValueError("--kv-events-port routes with cache_aware: give --policy cache_aware (or a "
                         "--prefill-policy/--decode-policy cache_aware)")
    path = cfg.tokenizer_path or cfg.model_path
    if not path:
        raise ValueError("--kv-events-port needs the model's tokenizer: --tokenizer-path or --model-path")
    tokenizer_file(path)
    for module in ("zmq", "msgspec", "tokenizers", "jinja2"):
        if importlib.util.find_spec(module) is None:
            raise ValueError("--kv-events-port needs the kv-events extra: pip install 'smg[kv-events]'")
    from smg.tokenizer import load_chat_template

    if cfg.chat_template is not None and not (os.path.isfile(cfg.chat_template)
                                              and os.path.getsize(cfg.chat_template) > 0):
        raise ValueError(f"--chat-template {cfg.chat_template}: not a file, or empty")
    load_chat_template(path, cfg.chat_template)     # one that does not parse is an error now, not at the first chat


def main(argv: Optional[Sequence[str]] = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if argv and argv[0] == "launch":  # the reference's subcommand spelling
        argv = argv[1:]
    cfg = config_from_args(argv)
    from smg.gateway import run

    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
