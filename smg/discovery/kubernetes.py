"""The Kubernetes pod watch: a thread that keeps a store of the pods matching
the configured selectors, using the official `kubernetes` client.

LIST, then WATCH from the list's resourceVersion with bookmarks, a server
timeout and a client read timeout; resume from the last resourceVersion seen
(events and bookmarks); on 410 Gone, LIST again and replace the store, so
deletions missed while disconnected are not lost. Other errors back off with
jitter (0.8 s doubling to 30 s); 401 reloads the credentials; 403 is logged
once, naming the RBAC rule that is missing. The store is never emptied
because the API server is unreachable.

The thread never touches gateway state: after each change it hands the loop
a copy of the store (coalesced: one pending delivery at a time)."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
from typing import Any, Callable, Optional

import orjson

from smg._fast.selector import Selector

log = logging.getLogger("smg.discovery.kubernetes")

WATCH_TIMEOUT_SECS = float(os.environ.get("SMG_K8S_WATCH_TIMEOUT_SECS", "60"))
BACKOFF_INITIAL_SECS = 0.8
BACKOFF_MAX_SECS = 30.0


@dataclasses.dataclass(frozen=True)
class PodInfo:
    """What discovery needs of a pod."""
    uid: str
    name: str
    namespace: str
    ip: Optional[str]
    phase: str
    ready: bool
    deleting: bool
    role: str                     # "regular", "prefill" or "decode"
    labels: dict
    annotations: dict
    resource_version: str = ""

    @property
    def routable(self) -> bool:
        return self.phase == "Running" and self.ready and not self.deleting


def pod_info(obj: dict, role: str) -> Optional[PodInfo]:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    uid = meta.get("uid")
    if not uid:
        return None
    ready = False
    for cond in status.get("conditions") or ():
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    return PodInfo(
        uid=uid,
        name=meta.get("name") or "",
        namespace=meta.get("namespace") or "",
        ip=status.get("podIP") or None,
        phase=status.get("phase") or "",
        ready=ready,
        deleting=bool(meta.get("deletionTimestamp")),
        role=role,
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        resource_version=str(meta.get("resourceVersion") or ""),
    )


class Roles:
    """Which role a pod has: regular mode has one selector; PD mode a prefill
    and a decode selector (prefill wins when both match)."""

    def __init__(self, regular: Optional[Selector] = None, prefill: Optional[Selector] = None,
                 decode: Optional[Selector] = None):
        self.regular = regular
        self.prefill = prefill
        self.decode = decode

    @property
    def pd(self) -> bool:
        return self.regular is None

    def role_of(self, labels: dict) -> Optional[str]:
        if self.regular is not None:
            return "regular" if self.regular.matches(labels) else None
        if self.prefill is not None and self.prefill.matches(labels):
            return "prefill"
        if self.decode is not None and self.decode.matches(labels):
            return "decode"
        return None

    def server_selector(self) -> str:
        """Sent with LIST/WATCH: the selector (regular mode), or only what both
        role selectors require (PD mode; empty means no server-side filter).
        Matches are always checked again here."""
        if self.regular is not None:
            return str(self.regular)
        if self.prefill is not None and self.decode is not None:
            return str(self.prefill.common(self.decode))
        return ""

    def describe(self) -> str:
        if self.regular is not None:
            return str(self.regular)
        return f"prefill: {self.prefill}, decode: {self.decode}"


class Gone(Exception):
    """410: the resourceVersion is too old; LIST again."""


def load_credentials() -> None:
    """In-cluster service account, else KUBECONFIG / ~/.kube/config.
    Raises kubernetes.config.ConfigException when neither is there."""
    from kubernetes import config

    if os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(
            "/var/run/secrets/kubernetes.io/serviceaccount/token"):
        config.load_incluster_config()
    else:
        config.load_kube_config()


class PodWatcher:
    def __init__(self, roles: Roles, namespace: Optional[str],
                 deliver: Callable[[dict[str, PodInfo], str], None], loop):
        self.roles = roles
        self.namespace = namespace
        self.deliver = deliver            # runs on the loop: deliver(store copy, reason)
        self.loop = loop
        self.store: dict[str, PodInfo] = {}
        self.lock = threading.Lock()
        self.pending = False
        self.pending_reason = ""
        self.resource_version: Optional[str] = None
        self.synced = threading.Event()   # the first LIST is in the store
        self.stop_event = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self._resp = None
        self._api = None
        self._forbidden_logged = False
        # for metrics/tests: how often the watch listed and resumed
        self.lists = 0
        self.watches = 0

    # --- lifecycle ---

    def start(self) -> None:
        where = f"namespace '{self.namespace}'" if self.namespace else "all namespaces"
        log.info("Watching pods in %s with selector '%s'", where, self.roles.describe())
        self.thread = threading.Thread(target=self._run, name="k8s-pod-watch", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self._close_response()
        if self.thread is not None:
            self.thread.join(timeout)

    def _close_response(self) -> None:
        resp = self._resp
        if resp is None:
            return
        try:
            conn = getattr(resp, "connection", None)
            sock = getattr(conn, "sock", None) if conn else None
            if sock is not None:
                import socket

                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- the watch loop ---

    def _client(self):
        if self._api is None:
            from kubernetes import client

            load_credentials()
            configuration = client.Configuration.get_default_copy()
            # no retries inside urllib3 (each logging a warning): the watch loop
            # retries with its own backoff and logs one line per failed attempt
            configuration.retries = 0
            self._api = client.CoreV1Api(client.ApiClient(configuration))
        return self._api

    def _run(self) -> None:
        backoff = BACKOFF_INITIAL_SECS
        need_list = True
        while not self.stop_event.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                got_events = self._watch()
                backoff = BACKOFF_INITIAL_SECS
                self._forbidden_logged = False
                if not got_events:
                    # a stream that ends at once, again and again, must not spin
                    self.stop_event.wait(min(backoff, 1.0))
                continue
            except Gone:
                log.info("Watch resourceVersion %s expired (410 Gone); listing pods again", self.resource_version)
                need_list = True
                continue
            except Exception as e:  # every failure keeps the store and retries
                if self.stop_event.is_set():
                    break
                delay = backoff * (0.8 + 0.4 * random.random())
                self._log_failure(e, delay)
                self.stop_event.wait(delay)
                backoff = min(backoff * 2, BACKOFF_MAX_SECS)

    def _log_failure(self, e: Exception, delay: float) -> None:
        from kubernetes.client.rest import ApiException
        from kubernetes.config import ConfigException

        if isinstance(e, ApiException) and e.status == 403:
            if not self._forbidden_logged:
                where = f"namespace '{self.namespace}'" if self.namespace else "all namespaces (a ClusterRole)"
                log.error("RBAC: forbidden to list/watch pods in %s: grant the service account get, list and "
                          "watch on pods (apiGroups [\"\"], resources [\"pods\"]) with a Role and RoleBinding; "
                          "see deploy/kubernetes/rbac.yaml", where)
                self._forbidden_logged = True
            return
        if isinstance(e, ApiException) and e.status == 401:
            log.warning("Kubernetes API answered 401 Unauthorized: reloading credentials; retrying in %.1f s", delay)
            self._api = None  # next attempt re-reads the token / kubeconfig
            return
        if isinstance(e, ConfigException):
            log.error("No Kubernetes configuration (in-cluster service account or KUBECONFIG): %s; "
                      "retrying in %.1f s", e, delay)
            self._api = None
            return
        if isinstance(e, ApiException):
            log.warning("Kubernetes API error %s %s; retrying in %.1f s", e.status, e.reason, delay)
        else:
            log.warning("Kubernetes API unreachable (%s: %s); keeping %d known pods, retrying in %.1f s",
                        type(e).__name__, e, len(self.store), delay)

    def _call(self, **kwargs):
        api = self._client()
        kwargs.setdefault("label_selector", self.roles.server_selector() or None)
        if kwargs["label_selector"] is None:
            del kwargs["label_selector"]
        if self.namespace:
            return api.list_namespaced_pod(self.namespace, _preload_content=False, **kwargs)
        return api.list_pod_for_all_namespaces(_preload_content=False, **kwargs)

    def _list(self) -> None:
        resp = self._call(_request_timeout=(10, 60))
        try:
            doc = orjson.loads(resp.data)
        finally:
            resp.release_conn()
        items = doc.get("items") or []
        store: dict[str, PodInfo] = {}
        for obj in items:
            info = self._accept(obj)
            if info is not None:
                store[info.uid] = info
        with self.lock:
            self.store = store
        self.resource_version = (doc.get("metadata") or {}).get("resourceVersion")
        self.lists += 1
        log.debug("listed %d pods (%d matching) at resourceVersion %s", len(items), len(store), self.resource_version)
        self.synced.set()
        self._publish("list")

    def _accept(self, obj: dict) -> Optional[PodInfo]:
        labels = ((obj.get("metadata") or {}).get("labels")) or {}
        role = self.roles.role_of(labels)
        if role is None:
            return None
        return pod_info(obj, role)

    def _watch(self) -> bool:
        """Follow the watch stream until it ends; True when anything arrived."""
        from kubernetes.client.rest import ApiException

        self.watches += 1
        kwargs: dict[str, Any] = dict(watch=True, allow_watch_bookmarks=True,
                                      timeout_seconds=int(WATCH_TIMEOUT_SECS),
                                      _request_timeout=(10, WATCH_TIMEOUT_SECS + 15))
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        try:
            resp = self._call(**kwargs)
        except ApiException as e:
            if e.status == 410:
                raise Gone() from None
            raise
        self._resp = resp
        got = False
        try:
            buf = b""
            for chunk in resp.stream(amt=None, decode_content=False):
                if self.stop_event.is_set():
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl], buf[nl + 1:]
                    if line.strip():
                        got = True
                        self._event(orjson.loads(line))
        finally:
            self._resp = None
            try:
                resp.release_conn()
            except Exception:
                pass
        return got

    def _event(self, event: dict) -> None:
        etype = event.get("type")
        obj = event.get("object") or {}
        if etype == "ERROR":
            code = obj.get("code")
            if code == 410:
                raise Gone()
            from kubernetes.client.rest import ApiException

            raise ApiException(status=code or 500, reason=f"{obj.get('reason')}: {obj.get('message')}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if etype == "BOOKMARK":
            if rv:
                self.resource_version = rv
            return
        uid = (obj.get("metadata") or {}).get("uid")
        if not uid:
            return
        changed = False
        with self.lock:
            if etype == "DELETED":
                changed = self.store.pop(uid, None) is not None
            elif etype in ("ADDED", "MODIFIED"):
                info = self._accept(obj)
                if info is None:
                    changed = self.store.pop(uid, None) is not None  # labels no longer match
                elif self.store.get(uid) != info:
                    self.store[uid] = info
                    changed = True
        if rv:
            self.resource_version = rv
        if changed:
            log.debug("pod event %s %s/%s", etype, (obj.get("metadata") or {}).get("namespace"),
                      (obj.get("metadata") or {}).get("name"))
            self._publish(etype.lower())

    # --- handing the store to the loop ---

    def _publish(self, reason: str) -> None:
        with self.lock:
            if self.pending:
                return
            self.pending = True
            self.pending_reason = reason
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: shutting down
            pass

    def _deliver(self) -> None:
        with self.lock:
            snapshot = dict(self.store)
            reason = self.pending_reason
            self.pending = False
        self.deliver(snapshot, reason)
