"""File-based worker discovery (--discovery-provider file --discovery-file
PATH): a JSON manifest lists the workers of a static fleet outside
Kubernetes, and the gateway follows it as it changes.

    {"version": 1,
     "workers": [{"url": "http://10.0.0.5:8000"},
                 {"url": "http://10.0.0.6:8000", "worker_type": "prefill", "bootstrap_port": 8998},
                 {"url": "http://10.0.0.7:8000", "worker_type": "decode", "model_id": "llama",
                  "id": "decode-7", "api_key": "...", "labels": {"rack": "b"}}]}

A worker's fields are the reference's (id, url, worker_type, bootstrap_port,
model_id, and kv_connector, kv_role, kv_engine_id, which smg keeps as
labels: it does not route on KV events) plus smg's api_key and labels.
Any other field makes the manifest invalid, as on the reference.

The file is checked every second (its size, modification time and inode)
and reread when it changed, and reread in full every
--discovery-check-interval-secs in any case. It may appear after start-up.
Workers it lists are registered like any other (health probe first);
workers it no longer lists are drained, then removed, as a deleted pod's
are. A worker whose entry changed (its type, bootstrap port, model or key)
is replaced. A manifest that cannot be read or is invalid changes nothing:
the last good fleet stays, and the problem is logged once per change of
the file. Workers added by other means (flags, the admin API) are never
touched."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator, Optional

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from smg._fast.worker import DECODE, DRAINING, PREFILL, REGULAR, Worker, split_url
from smg.workers import endpoint_label_error, normalize_url

if TYPE_CHECKING:
    from smg.gateway import ControlPlane

log = logging.getLogger("smg.discovery")

SOURCE = "file"
MANIFEST_VERSION = 1
POLL_SECS = 1.0
MAX_MANIFEST_BYTES = 16 << 20
WORKER_TYPES = {"regular": REGULAR, "prefill": PREFILL, "decode": DECODE}
KV_FIELDS = ("kv_connector", "kv_role", "kv_engine_id")
WORKER_FIELDS = ("id", "url", "worker_type", "bootstrap_port", "model_id", *KV_FIELDS, "api_key", "labels")


class ManifestError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ManifestWorker:
    worker_id: Optional[str]
    url: str
    worker_type: int
    bootstrap_port: Optional[int]
    model_id: Optional[str]
    api_key: Optional[str]
    labels: tuple[tuple[str, str], ...]


def parse_manifest(data: bytes) -> dict[str, ManifestWorker]:
    """The workers of a manifest, by normalized URL; ManifestError says what is wrong."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ManifestError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError("the manifest must be a JSON object")
    if "version" not in doc:
        raise ManifestError(f'"version" is missing (this gateway reads version {MANIFEST_VERSION})')
    if doc["version"] != MANIFEST_VERSION:
        raise ManifestError(f'unsupported "version" {doc["version"]!r} (this gateway reads {MANIFEST_VERSION})')
    unknown = sorted(set(doc) - {"version", "workers"})
    if unknown:
        raise ManifestError(f"unknown field {unknown[0]!r}")
    items = doc.get("workers")
    if not isinstance(items, list):
        raise ManifestError('"workers" must be a list')
    out: dict[str, ManifestWorker] = {}
    for i, item in enumerate(items):
        where = f"workers[{i}]"
        if not isinstance(item, dict):
            raise ManifestError(f"{where} must be an object")
        unknown = sorted(set(item) - set(WORKER_FIELDS))
        if unknown:
            raise ManifestError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(WORKER_FIELDS)})")
        url = item.get("url")
        if not isinstance(url, str):
            raise ManifestError(f'{where}: "url" is required')
        try:
            split_url(url)
        except ValueError as e:
            raise ManifestError(f"{where}: {e}") from None
        kind = item.get("worker_type", "regular")
        if kind not in WORKER_TYPES:
            raise ManifestError(f'{where}: "worker_type" must be regular, prefill or decode')
        port = item.get("bootstrap_port")
        if port is not None and (type(port) is not int or not 0 < port < 65536):
            raise ManifestError(f'{where}: "bootstrap_port" must be a port number or null')
        if port is not None and kind != "prefill":
            raise ManifestError(f'{where}: "bootstrap_port" is for prefill workers')
        for field in ("id", "model_id", "api_key", *KV_FIELDS):
            if item.get(field) is not None and (not isinstance(item[field], str) or not item[field]):
                raise ManifestError(f'{where}: "{field}" must be a non-empty string')
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in labels.items()):
            raise ManifestError(f'{where}: "labels" must map strings to strings')
        labels = {**labels, **{f: item[f] for f in KV_FIELDS if item.get(f) is not None}}
        bad = endpoint_label_error(labels)
        if bad is not None:
            raise ManifestError(f"{where}: {bad}")
        key = normalize_url(url)
        if key in out:
            raise ManifestError(f"{where}: {url} is listed twice")
        if item.get("id") is not None and any(w.worker_id == item["id"] for w in out.values()):
            raise ManifestError(f'{where}: id {item["id"]!r} is used twice')
        out[key] = ManifestWorker(item.get("id"), key, WORKER_TYPES[kind], port, item.get("model_id"),
                                  item.get("api_key"), tuple(sorted(labels.items())))
    return out


class FileDiscovery:
    """Follows the manifest: registers, replaces and drains the workers it lists."""

    def __init__(self, gw: ControlPlane):
        self.gw = gw
        self.path = gw.cfg.discovery_file
        self.interval = gw.cfg.discovery_check_interval_secs
        self.owned: dict[str, tuple[ManifestWorker, Worker]] = {}
        self.task: Optional[asyncio.Task] = None
        self.stamp: Optional[tuple] = None          # (inode, size, mtime) last read
        self.reported: Optional[tuple] = None       # the stamp whose problem was logged
        self.errors = 0
        self.added = 0
        self.removed = 0
        gw.metric_sources.append(self.collect)

    def start(self) -> None:
        log.info("Starting file service discovery | manifest: %s (reread on change, and every %g s)",
                 self.path, self.interval)
        self.task = self.gw.loop.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        last_full = float("-inf")
        while True:
            now = self.gw.loop.time()
            stamp = self._stat()
            if stamp != self.stamp or now - last_full >= self.interval:
                last_full = now
                self.check(stamp)
            await asyncio.sleep(POLL_SECS)

    def _stat(self) -> Optional[tuple]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            return ("error", str(e))
        return st.st_ino, st.st_size, st.st_mtime_ns

    def check(self, stamp: Optional[tuple]) -> None:
        """Read the manifest and apply it, or keep the fleet and say why."""
        self.stamp = stamp
        try:
            if stamp is None:
                raise FileNotFoundError
            with open(self.path, "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
            if len(data) > MAX_MANIFEST_BYTES:
                raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
            desired = parse_manifest(data)
        except FileNotFoundError:
            self._problem(stamp, logging.WARNING, "Discovery manifest %s does not exist (yet): waiting for it; "
                          "%d workers kept", self.path, len(self.owned))
            return
        except (OSError, ManifestError) as e:
            self.errors += 1
            self._problem(stamp, logging.ERROR, "Invalid discovery manifest %s: %s; keeping the last good manifest "
                          "(%d workers)", self.path, e, len(self.owned))
            return
        self.reported = None
        self.apply(desired)

    def _problem(self, stamp: Optional[tuple], level: int, message: str, *args: Any) -> None:
        if self.reported != ("problem", stamp):
            self.reported = ("problem", stamp)
            log.log(level, message, *args)

    def apply(self, desired: dict[str, ManifestWorker]) -> None:
        gw = self.gw
        registry = gw.registry
        deferred = False
        for url, (entry, w) in list(self.owned.items()):
            if registry.get(w.id) is not w or w.state == DRAINING:
                del self.owned[url]  # removed by other means (the admin API, failed registration)
                continue
            if desired.get(url) != entry:
                reason = "no longer listed" if url not in desired else "entry changed"
                log.info("Removing worker %s (discovery manifest: %s)", url, reason)
                gw.registrar.cancel(w)
                registry.drain(w, f"manifest: {reason}")
                del self.owned[url]
                self.removed += 1
        for url, entry in desired.items():
            if url in self.owned:
                continue
            existing = registry.find_url(url)
            if existing is not None:
                # a worker of the flags or the admin API is never touched; one
                # of ours still draining under this URL is replaced when gone
                deferred = deferred or registry.source_of(existing) == SOURCE
                continue
            if entry.worker_id is not None and registry.get(entry.worker_id) is not None:
                deferred = True  # its id is still held by a draining worker
                continue
            w = registry.add(url, entry.worker_type, entry.bootstrap_port, dict(entry.labels), entry.api_key,
                             source=SOURCE, model_id=entry.model_id, worker_id=entry.worker_id)
            log.info("Discovered worker %s (discovery manifest)", url)
            gw.registrar.register(w, entry.model_id)
            self.owned[url] = (entry, w)
            self.added += 1
        if deferred:
            self.stamp = ("deferred",)  # look again at the next poll
    def collect(self) -> Iterator:
        workers = GaugeMetricFamily("smg_discovery_file_workers", "Workers listed by the discovery manifest")
        workers.add_metric([], len(self.owned))
        yield workers
        errors = CounterMetricFamily("smg_discovery_file_errors", "Discovery manifest reads that failed or were invalid")
        errors.add_metric([], self.errors)
        yield errors
        changes = CounterMetricFamily("smg_discovery_file_changes", "Workers added or removed by the manifest",
                                      labels=["change"])
        changes.add_metric(["added"], self.added)
        changes.add_metric(["removed"], self.removed)
        yield changes
