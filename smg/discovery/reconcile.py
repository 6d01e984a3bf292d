"""Level-triggered reconciliation of discovered pods with the worker registry.

Every pass recomputes the desired workers from the whole pod store and diffs
them against the workers discovery owns (label `smg.ai/pod-uid`):
  - owned but no longer desired (pod deleted, terminating, no longer
    matching, or re-created with a new uid): drained at once;
  - desired, routable (Running and Ready) and not owned: registered.
A pod that turns unready keeps its worker: health checks own that state.
Workers that discovery did not add are never touched. Passes run after every
change of the store (a burst coalesces into one pass) and periodically."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Iterator, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from smg._fast.selector import parse_selector_items
from smg._fast.routes import BUCKETS
from smg._fast.worker import DECODE, DRAINING, PREFILL, REGULAR, Worker
from smg.discovery.kubernetes import PodInfo, PodWatcher, Roles
from smg.workers import (KV_EVENTS_LABEL, KV_EVENTS_PORT_ANNOTATION, KV_REPLAY_LABEL,
                         KV_REPLAY_PORT_ANNOTATION)

if TYPE_CHECKING:
    from smg.gateway import ControlPlane

log = logging.getLogger("smg.discovery")

LABEL_POD_NAME = "smg.ai/pod-name"
LABEL_POD_UID = "smg.ai/pod-uid"
LABEL_POD_NAMESPACE = "smg.ai/pod-namespace"
RESYNC_SECS = 30.0
SYNC_BUCKETS = BUCKETS  # the reference's buckets, as for smg_http_request_duration_seconds
ROLE_TYPES = {"regular": REGULAR, "prefill": PREFILL, "decode": DECODE}


@dataclasses.dataclass(frozen=True)
class DesiredWorker:
    url: str
    port: int
    worker_type: int
    bootstrap_port: Optional[int]
    model_id: Optional[str]
    pod: PodInfo


def parse_ports(value: str) -> list[int]:
    """'8000,8001' -> [8000, 8001]; ValueError on anything else."""
    ports = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 65536:
            raise ValueError(f"invalid port {part!r}")
        ports.append(int(part))
    if not ports or len(set(ports)) != len(ports):
        raise ValueError("empty or repeated ports")
    return ports


def worker_url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


class Planner:
    """Desired workers of a pod, from the flags and the pod's annotations."""

    def __init__(self, default_port: int, ports_annotation: str, bootstrap_annotation: str,
                 model_id_from: Optional[str]):
        self.default_port = default_port
        self.ports_annotation = ports_annotation
        self.bootstrap_annotation = bootstrap_annotation
        self.model_id_from = model_id_from
        self._warned: set[tuple[str, str]] = set()

    def _warn_once(self, pod: PodInfo, what: str, message: str, *args) -> None:
        if (pod.uid, what) not in self._warned:
            self._warned.add((pod.uid, what))
            log.warning(message, *args)

    def ports(self, pod: PodInfo) -> list[int]:
        raw = pod.annotations.get(self.ports_annotation)
        if raw is None:
            return [self.default_port]
        try:
            return parse_ports(raw)
        except ValueError as e:
            self._warn_once(pod, "ports", "Pod %s/%s: invalid %s annotation %r (%s); using port %d",
                            pod.namespace, pod.name, self.ports_annotation, raw, e, self.default_port)
            return [self.default_port]

    def bootstrap_ports(self, pod: PodInfo, count: int) -> list[Optional[int]]:
        raw = pod.annotations.get(self.bootstrap_annotation)
        if pod.role != "prefill" or raw is None:
            return [None] * count
        try:
            values = parse_ports(raw) if "," in raw else [parse_ports(raw)[0]]
        except ValueError as e:
            self._warn_once(pod, "bootstrap", "Pod %s/%s: invalid %s annotation %r (%s); no bootstrap port",
                            pod.namespace, pod.name, self.bootstrap_annotation, raw, e)
            return [None] * count
        if len(values) == 1:
            return values * count
        if len(values) != count:
            self._warn_once(pod, "bootstrap", "Pod %s/%s: %s has %d ports for %d workers; no bootstrap port",
                            pod.namespace, pod.name, self.bootstrap_annotation, len(values), count)
            return [None] * count
        return list(values)

    def kv_event_labels(self, pod: PodInfo, port: int) -> dict:
        """The labels naming the KV-event publisher and replay socket of the
        pod's worker on `port`, from the pod's annotations: a port, or one
        per worker port in the order of the ports annotation. A bad one is
        warned about once and left out (the --kv-events-port default
        applies)."""
        out = {}
        ports = self.ports(pod)
        for annotation, label in ((KV_EVENTS_PORT_ANNOTATION, KV_EVENTS_LABEL),
                                  (KV_REPLAY_PORT_ANNOTATION, KV_REPLAY_LABEL)):
            raw = pod.annotations.get(annotation)
            if raw is None:
                continue
            try:
                values = parse_ports(raw)
                if len(values) != len(ports):
                    raise ValueError(f"{len(values)} ports for {len(ports)} workers")
            except ValueError as e:
                self._warn_once(pod, annotation, "Pod %s/%s: invalid %s annotation %r (%s); ignored",
                                pod.namespace, pod.name, annotation, raw, e)
                continue
            host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
            out[label] = f"tcp://{host}:{values[ports.index(port)] if port in ports else values[0]}"
        return out

    def model_id(self, pod: PodInfo) -> Optional[str]:
        src = self.model_id_from
        if not src:
            return None
        if src == "namespace":
            return pod.namespace or None
        if src.startswith("label:"):
            return pod.labels.get(src[6:]) or None
        if src.startswith("annotation:"):
            return pod.annotations.get(src[11:]) or None
        return None

    def desired(self, store: dict[str, PodInfo]) -> dict[tuple[str, int], DesiredWorker]:
        out: dict[tuple[str, int], DesiredWorker] = {}
        for pod in store.values():
            if not pod.uid or not pod.ip or pod.deleting:
                continue
            ports = self.ports(pod)
            bootstrap = self.bootstrap_ports(pod, len(ports))
            model = self.model_id(pod)
            for port, bport in zip(ports, bootstrap):
                out[(pod.uid, port)] = DesiredWorker(worker_url(pod.ip, port), port, ROLE_TYPES[pod.role], bport,
                                                     model, pod)
        return out


class Discovery:
    def __init__(self, gw: ControlPlane):
        cfg = gw.cfg
        self.gw = gw
        self.loop = gw.loop
        if cfg.pd_disaggregation:
            roles = Roles(prefill=parse_selector_items(cfg.prefill_selector, "--prefill-selector"),
                          decode=parse_selector_items(cfg.decode_selector, "--decode-selector"))
        else:
            roles = Roles(regular=parse_selector_items(cfg.selector, "--selector"))
        self.planner = Planner(cfg.service_discovery_port, cfg.worker_ports_annotation,
                               cfg.bootstrap_port_annotation, cfg.model_id_from)
        self.watcher = PodWatcher(roles, cfg.service_discovery_namespace, self._on_store, self.loop)
        self.store: dict[str, PodInfo] = {}
        self._scheduled = False
        self._resync_handle: Optional[asyncio.TimerHandle] = None
        # metrics (label source="kubernetes")
        self.registrations: dict[str, int] = {}
        self.deregistrations: dict[str, int] = {}
        self.sync_counts = [0] * (len(SYNC_BUCKETS) + 1)
        self.sync_sum = 0.0
        self.sync_count = 0
        self.passes = 0
        gw.metric_sources.append(self.metrics)

    def start(self) -> None:
        self.watcher.start()
        self._resync_handle = self.loop.call_later(RESYNC_SECS, self._resync)

    async def stop(self) -> None:
        if self._resync_handle is not None:
            self._resync_handle.cancel()
        await self.loop.run_in_executor(None, self.watcher.stop)

    # --- triggers ---

    def _on_store(self, store: dict[str, PodInfo], reason: str) -> None:
        self.store = store
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._pass)

    def _resync(self) -> None:
        self._resync_handle = self.loop.call_later(RESYNC_SECS, self._resync)
        if self.watcher.synced.is_set():
            self._pass()

    def _pass(self) -> None:
        self._scheduled = False
        t0 = time.perf_counter()
        try:
            self.reconcile()
        except Exception:
            log.exception("discovery reconcile failed")
        elapsed = time.perf_counter() - t0
        self.passes += 1
        self.sync_sum += elapsed
        self.sync_count += 1
        for i, bound in enumerate(SYNC_BUCKETS):
            if elapsed <= bound:
                self.sync_counts[i] += 1
                break
        else:
            self.sync_counts[-1] += 1

    # --- the pass ---

    def owned(self) -> dict[tuple[str, int], Worker]:
        out = {}
        for w in self.gw.registry.all():
            if self.gw.registry.source_of(w) != "kubernetes" or w.state == DRAINING:
                continue
            uid = w.labels.get(LABEL_POD_UID)
            if uid:
                out[(uid, w.port)] = w
        return out

    def reconcile(self) -> None:
        registry = self.gw.registry
        desired = self.planner.desired(self.store)
        owned = self.owned()
        for key, w in owned.items():
            want = desired.get(key)
            if want is not None and want.url == w.url:
                continue
            pod = self.store.get(key[0])
            if pod is None:
                reason = "deleted"
            elif pod.deleting:
                reason = "terminating"
            elif want is None:
                reason = "port_removed"
            else:
                reason = "ip_changed"
            log.info("Removing worker %s (pod %s %s)", w.url, w.labels.get(LABEL_POD_NAME), reason)
            self.gw.registrar.cancel(w)
            registry.drain(w, f"pod {reason}")
            self.deregistrations[reason] = self.deregistrations.get(reason, 0) + 1
        for key, want in desired.items():
            if key in owned and owned[key].url == want.url:
                continue
            if not want.pod.routable:
                continue
            existing = registry.find_url(want.url)
            if existing is not None:
                if registry.source_of(existing) != "kubernetes":
                    continue  # a manual worker at this address: never touched
                if existing.labels.get(LABEL_POD_UID) != want.pod.uid:
                    # an older pod's worker still holds the address
                    self.gw.registrar.cancel(existing)
                    registry.drain(existing, "pod replaced")
                    self.deregistrations["uid_changed"] = self.deregistrations.get("uid_changed", 0) + 1
                else:
                    continue
            self._add(key, want)

    def _add(self, key: tuple[str, int], want: DesiredWorker) -> None:
        pod = want.pod
        log.info("Discovered new pod: %s (%s:%d)", pod.name, pod.ip, want.port)
        labels = {LABEL_POD_NAME: pod.name, LABEL_POD_UID: pod.uid, LABEL_POD_NAMESPACE: pod.namespace,
                  **self.planner.kv_event_labels(pod, want.port)}
        w = self.gw.registry.add(want.url, want.worker_type, want.bootstrap_port, labels, source="kubernetes",
                                 model_id=want.model_id)
        task = self.gw.registrar.register(w, want.model_id)
        task.add_done_callback(self._registered)

    def _registered(self, task: asyncio.Task) -> None:
        if task.cancelled():
            result = "cancelled"
        elif task.exception() is not None or not task.result():
            result = "failed"
        else:
            result = "success"
        self.registrations[result] = self.registrations.get(result, 0) + 1
        if result == "failed" and not self._scheduled:
            # the pod may still be there: a later pass retries it
            self._resync_soon()

    def _resync_soon(self) -> None:
        self.loop.call_later(1.0, lambda: self.watcher.synced.is_set() and self._pass())

    # --- metrics ---

    def metrics(self) -> Iterator:
        discovered = GaugeMetricFamily("smg_discovery_workers_discovered", "Workers known via discovery",
                                       labels=["source"])
        discovered.add_metric(["kubernetes"], len(self.owned()))
        yield discovered
        regs = CounterMetricFamily("smg_discovery_registrations", "Worker registration events",
                                   labels=["source", "result"])
        for result in ("success", "failed"):
            regs.add_metric(["kubernetes", result], self.registrations.get(result, 0))
        yield regs
        deregs = CounterMetricFamily("smg_discovery_deregistrations", "Worker deregistration events",
                                     labels=["source", "reason"])
        for reason, n in sorted(self.deregistrations.items()):
            deregs.add_metric(["kubernetes", reason], n)
        yield deregs
        hist = HistogramMetricFamily("smg_discovery_sync_duration_seconds",
                                     "Duration of each reconciliation pass", labels=["source"])
        acc = 0
        buckets = []
        for bound, n in zip(SYNC_BUCKETS, self.sync_counts):
            acc += n
            buckets.append((f"{bound:g}", acc))
        buckets.append(("+Inf", acc + self.sync_counts[-1]))
        hist.add_metric(["kubernetes"], buckets, self.sync_sum)
        yield hist
