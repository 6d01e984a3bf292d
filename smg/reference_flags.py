"""The reference gateway's flags that smg does not implement, by feature.

A launch line written for the reference must never fail with argparse's
"unrecognized arguments": every flag of `smg launch --help` (smg==1.13.0)
parses here, with the reference's arity. What happens then:

- NOT_SUPPORTED: features smg deliberately leaves out (they need an
  in-gateway tokenizer, gRPC/ZMQ engines, storage, ...). Giving the flag
  exits with status 2 and one line naming the flag and the feature.
- NO_EFFECT: flags that tune machinery smg does not have, where smg
  already behaves as the flag asks (e.g. --disable-tokenizer-autoload:
  smg never loads a tokenizer). Accepted; the gateway logs one line
  naming them at start-up. `accepted` limits the values accepted; any
  other value is NOT_SUPPORTED.

Each entry: (flag names, nargs) where nargs is 0 for a switch, 1 for one
value, "*" or "+" for a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

Nargs = Union[int, str]


@dataclass(frozen=True)
class FlagGroup:
    feature: str
    flags: tuple[tuple[tuple[str, ...], Nargs], ...]
    # NO_EFFECT groups: the values accepted (None: any)
    accepted: Optional[dict[str, tuple[str, ...]]] = field(default=None)


def _f(*names: str, nargs: Nargs = 1) -> tuple[tuple[str, ...], Nargs]:
    return names, nargs


NOT_SUPPORTED = (
    FlagGroup("tokenizer caches in the gateway (smg tokenizes only for --kv-events-port, with a cache of its own)", (
        _f("--tokenizer-cache-enable-l0", nargs=0), _f("--tokenizer-cache-l0-max-entries"),
        _f("--tokenizer-cache-enable-l1", nargs=0), _f("--tokenizer-cache-l0-max-memory"),
        _f("--tokenizer-cache-l1-max-memory"),
    )),
    FlagGroup("reasoning and tool-call parsing in the gateway (workers parse)", (
        _f("--parser"), _f("--tool-call-parser"), _f("--reasoning-parser"),
    )),
    FlagGroup("gRPC and ZMQ engine connections (smg talks HTTP to workers)", (
        _f("--zmq-engine-count"),
    )),
    FlagGroup("multimodal preprocessing in the gateway", (
        _f("--multimodal-tensor-transport"), _f("--multimodal-shm-min-bytes"), _f("--multimodal-max-inflight-bytes"),
        _f("--mm-per-request-image-limit"), _f("--mm-processing"), _f("--mm-pixel-cache-mb"),
        _f("--mm-pixel-rdma", nargs=0), _f("--mm-allowed-media-domains"),
        _f("--mm-allow-private-media-hosts", nargs=0), _f("--rdma-listen-ip"), _f("--rdma-slot-ttl-s"),
        _f("--log-mm-timing", nargs=0),
    )),
    FlagGroup("encode-prefill-decode (EPD) disaggregation", (
        _f("--epd-disaggregation", nargs=0), _f("--encode", nargs="+"), _f("--encode-policy"),
        _f("--encode-selector", nargs="+"),
    )),
    FlagGroup("stored responses and database history backends (smg keeps conversations in memory)", (
        _f("--schema-config"), _f("--max-background-responses"),
        _f("--oracle-wallet-path"), _f("--oracle-tns-alias"), _f("--oracle-connect-descriptor"),
        _f("--oracle-username"), _f("--oracle-password"), _f("--oracle-external-auth", nargs=0),
        _f("--oracle-pool-min"), _f("--oracle-pool-max"), _f("--oracle-pool-timeout-secs"),
        _f("--postgres-db-url"), _f("--postgres-pool-max"), _f("--postgres-op-timeout-secs"),
        _f("--redis-url"), _f("--redis-pool-max"), _f("--redis-retention-days"), _f("--redis-op-timeout-secs"),
        _f("--storage-context-headers", nargs="*"), _f("--trust-tenant-header", nargs=0),
        _f("--tenant-header-name"),
    )),
    FlagGroup("MCP (Model Context Protocol) tools", (_f("--mcp-config-path"),)),
    FlagGroup("WebAssembly modules", (_f("--enable-wasm", nargs=0), _f("--storage-hook-wasm-path"))),
    FlagGroup("the RL control plane", (
        _f("--enable-rl", nargs=0), _f("--rl-control-timeout-secs"), _f("--rl-fanout-concurrency"),
    )),
    FlagGroup("the HA mesh between routers (smg replicas agree on placement without talking)", (
        _f("--enable-mesh", nargs=0), _f("--mesh-server-name"), _f("--mesh-host"), _f("--mesh-advertise-host"),
        _f("--mesh-port"), _f("--mesh-peer-urls", nargs="*"), _f("--mesh-tls-ca-cert"), _f("--mesh-tls-cert"),
        _f("--mesh-tls-key"), _f("--router-selector", nargs="+"),
    )),
    FlagGroup("control-plane roles and JWT/OIDC (smg has --admin-api-key)", (
        _f("--control-plane-api-keys", nargs="*"), _f("--control-plane-audit-enabled", nargs=0),
        _f("--jwt-issuer"), _f("--jwt-audience"), _f("--jwt-jwks-uri"), _f("--jwt-role-mapping", nargs="*"),
    )),
    FlagGroup("tenants, priority scheduling and rate limits", (
        _f("--tenant-api-key"), _f("--priority-scheduler-enabled", nargs=0),
        _f("--priority-scheduler-default-max-class"), _f("--priority-scheduler-config"),
        _f("--priority-scheduler-tenant-metric-top-n"), _f("--tenant-rate-limit-enabled", nargs=0),
        _f("--tenant-rate-limit-config"), _f("--rate-limit-tokens-per-second"),
    )),
    FlagGroup("routing on engine-reported load and KV events (smg routes on the requests it has in flight)", (
        _f("--kv-index"), _f("--block-size"), _f("--cache-boundaries"), _f("--cache-index"), _f("--cache-ttl-secs"),
        _f("--selection-policy"), _f("--selection-accounting-ttl-ms"), _f("--overlap-decay"),
        _f("--selection-temperature"), _f("--balance-token-usage-threshold"),
        _f("--overload-token-usage-threshold"), _f("--worker-overload-waiting-requests"),
        _f("--worker-overload-token-usage"), _f("--worker-overload-protection", nargs=0),
        _f("--worker-overload-shed", nargs=0), _f("--worker-stall-secs"), _f("--worker-wedge-secs"),
        _f("--worker-stale-secs"), _f("--worker-warmup-secs"), _f("--worker-warmup-share"),
        _f("--worker-warmup-blocks"), _f("--worker-warmup-thin-ratio"), _f("--worker-warmup-divert-every"),
        _f("--load-monitor-interval"), _f("--power-of-two-load-metric"), _f("--least-load-kv-pressure-weight"),
        _f("--least-load-default-throughput"), _f("--least-load-mean-prefill-tokens"),
        _f("--least-load-max-waiting-requests"), _f("--kv-connector-annotation"), _f("--kv-engine-id-annotation"),
        _f("--pd-admission-wait-secs"), _f("--dp-minimum-tokens-scheduler", nargs=0),
    )),
    FlagGroup("HTTP/2 to workers", (_f("--upstream-http2", nargs=0),)),
    FlagGroup("jemalloc heap profiles", (_f("--jemalloc-prof-dir"),)),
)

NO_EFFECT = (
    FlagGroup("smg loads a tokenizer only from a local --tokenizer-path or --model-path",
              (_f("--disable-tokenizer-autoload", nargs=0),)),
    FlagGroup("smg does not poll worker loads", (_f("--disable-load-monitoring", nargs=0),)),
    FlagGroup("smg always routes by the request's model when workers serve several (IGW mode is on)",
              (_f("--enable-igw", nargs=0),)),
    FlagGroup("smg has no worker overload protection to switch off",
              (_f("--disable-worker-overload-protection", nargs=0),)),
    FlagGroup("smg has no control-plane job queue to size", (
        _f("--job-queue-capacity"), _f("--job-queue-concurrency"),
    )),
    FlagGroup("workers are HTTP servers of either engine", (_f("--backend"),),
              accepted={"--backend": ("sglang", "vllm")}),
    FlagGroup("smg stores no responses (the engines do; smg asks them)",
              (_f("--history-memory-max-responses"),)),
)


def all_groups() -> tuple[tuple[str, FlagGroup], ...]:
    return (tuple(("not supported", g) for g in NOT_SUPPORTED)
            + tuple(("no effect", g) for g in NO_EFFECT))
