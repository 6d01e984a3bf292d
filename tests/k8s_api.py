"""An emulated Kubernetes API server for discovery tests, built on kmock.

kmock's KubernetesEmulator serves the HTTP API to the real `kubernetes`
client. It does not apply label selectors, assign resourceVersions, resume
watches, expire them (410) or send bookmarks; PodApi adds exactly that for
pods, as a real API server does:

  - every change gets the next resourceVersion and goes into an event log;
  - LIST filters by namespace and labelSelector and reports the current
    resourceVersion;
  - WATCH replays the log after the requested resourceVersion, then follows
    new events; a resourceVersion older than the compacted log gets an ERROR
    event with code 410; bookmarks every `bookmark_interval` seconds when
    allowWatchBookmarks=true; the stream ends after timeoutSeconds;
  - `cut_watches()` ends every open watch (a dropped connection), `compact()`
    forgets history (so a resume gets 410), `fail_status` answers every
    LIST/WATCH with that status (401, 403, 500), and `down()`/`up()` stop and
    restart the listener on the same port (an unreachable API server).

ApiServer runs it in a thread with its own event loop and offers a
synchronous API to tests, plus a kubeconfig file pointing at it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import re
import tempfile
import threading
import uuid
from typing import Any, Optional

from kmock import KubernetesEmulator, KubernetesError, Server


def _selector_matches(selector: str, labels: dict) -> bool:
    """Kubernetes label selector evaluation, written independently of smg's."""
    if not selector:
        return True
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(selector):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    for part in (p.strip() for p in parts):
        m = re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", part)
        if m:
            values = {v.strip() for v in m.group(3).split(",")}
            has = m.group(1) in labels and labels[m.group(1)] in values
            if (m.group(2) == "in") != has:
                return False
        elif "!=" in part:
            k, v = part.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in part:
            k, v = part.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif part.startswith("!"):
            if part[1:].strip() in labels:
                return False
        elif part not in labels:
            return False
    return True


class PodApi(KubernetesEmulator):
    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources["v1/pods"] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.log: list[tuple[int, str, dict]] = []
        self.rv = 1000
        self.compacted_rv = 0
        self.generation = 0
        self.changed = asyncio.Condition()
        self.fail_status: Optional[int] = None
        self.bookmark_interval = 1.0
        self.list_requests: list[dict] = []
        self.watch_requests: list[dict] = []

    # --- changes (called on the emulator's loop) ---

    async def _record(self, etype: str, pod: dict) -> None:
        self.rv += 1
        pod["metadata"]["resourceVersion"] = str(self.rv)
        self.log.append((self.rv, etype, copy.deepcopy(pod)))
        async with self.changed:
            self.changed.notify_all()

    async def put_pod(self, pod: dict) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        etype = "MODIFIED" if key in self.pods else "ADDED"
        self.pods[key] = pod
        await self._record(etype, pod)

    async def delete_pod(self, namespace: str, name: str) -> None:
        pod = self.pods.pop((namespace, name))
        await self._record("DELETED", pod)

    async def cut_watches(self) -> None:
        self.generation += 1
        async with self.changed:
            self.changed.notify_all()

    def compact(self) -> None:
        self.compacted_rv = self.rv
        self.log.clear()

    # --- serving ---

    def _check(self) -> None:
        if self.fail_status is not None:
            raise KubernetesError(status=self.fail_status, reason="Injected", message=f"injected {self.fail_status}")

    def _visible(self, request, pod: dict) -> bool:
        ns = request.namespace
        if ns and pod["metadata"].get("namespace") != ns:
            return False
        return _selector_matches(request.params.get("labelSelector", ""), pod["metadata"].get("labels") or {})

    async def _serve_list(self, request):
        self._check()
        self.list_requests.append(dict(request.params) | {"namespace": request.namespace})
        items = [copy.deepcopy(p) for p in self.pods.values() if self._visible(request, p)]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items}

    async def _serve_watch(self, request):
        self._check()
        params = request.params
        self.watch_requests.append(dict(params) | {"namespace": request.namespace})
        yield b""
        generation = self.generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(params.get("timeoutSeconds") or 3600)
        bookmarks = params.get("allowWatchBookmarks") == "true"
        since = params.get("resourceVersion")
        if since in (None, "", "0"):
            for pod in list(self.pods.values()):
                if self._visible(request, pod):
                    yield {"type": "ADDED", "object": copy.deepcopy(pod)}
            pos = self.rv
        else:
            pos = int(since)
            if pos < self.compacted_rv:
                yield {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                   "message": f"too old resource version: {pos} ({self.compacted_rv})",
                                                   "reason": "Expired", "code": 410}}
                return
        next_bookmark = loop.time() + self.bookmark_interval
        while True:
            for rv, etype, pod in [e for e in self.log if e[0] > pos]:
                pos = rv
                if self._visible(request, pod):
                    yield {"type": etype, "object": pod}
            pos = max(pos, self.rv)
            now = loop.time()
            if self.generation != generation or now >= deadline or self.fail_status is not None:
                return
            if bookmarks and now >= next_bookmark:
                next_bookmark = now + self.bookmark_interval
                yield {"type": "BOOKMARK",
                       "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}}
            wait = min(deadline, next_bookmark if bookmarks else deadline) - now
            try:
                async with self.changed:
                    await asyncio.wait_for(self.changed.wait(), timeout=max(0.01, min(wait, 1.0)))
            except asyncio.TimeoutError:
                pass


def make_pod(name: str, ip: Optional[str], labels: dict, namespace: str = "inference", ready: bool = True,
             phase: str = "Running", annotations: Optional[dict] = None, uid: Optional[str] = None,
             deleting: bool = False) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
                            "labels": dict(labels), "annotations": dict(annotations or {})}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T00:00:00Z"
    status: dict[str, Any] = {"phase": phase,
                              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {"containers": [{"name": "w"}]},
            "status": status}


class ApiServer:
    """PodApi on its own thread and loop, with a synchronous API."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.api: Optional[PodApi] = None
        self.server: Optional[Server] = None
        self.port: Optional[int] = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="k8s-api", daemon=True)
        self.kubeconfig = tempfile.NamedTemporaryFile("w", prefix="kubeconfig-", suffix=".yaml", delete=False)

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> "ApiServer":
        self.thread.start()

        async def boot():
            self.api = PodApi()
            await self.api.__aenter__()
            self.server = Server(self.api)
            await self.server.__aenter__()
            self.port = self.server.port

        self._run(boot())
        self.kubeconfig.write(f"""apiVersion: v1
kind: Config
clusters:
- name: emulated
  cluster:
    server: http://127.0.0.1:{self.port}
contexts:
- name: emulated
  context:
    cluster: emulated
    user: tester
current-context: emulated
users:
- name: tester
  user:
    token: test-token
""")
        self.kubeconfig.flush()
        return self

    def stop(self) -> None:
        async def shutdown():
            if self.server is not None and self.server._managed_server is not None:
                await self.api.cut_watches()
                await self.server.__aexit__(None, None, None)
            await self.api.__aexit__(None, None, None)

        try:
            self._run(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            os.unlink(self.kubeconfig.name)

    @property
    def env(self) -> dict:
        return {"KUBECONFIG": self.kubeconfig.name, "KUBERNETES_SERVICE_HOST": ""}

    # --- pods ---

    def add(self, pod: dict) -> dict:
        self._run(self.api.put_pod(copy.deepcopy(pod)))
        return pod

    def update(self, pod: dict) -> dict:
        return self.add(pod)

    def set_ready(self, pod: dict, ready: bool) -> dict:
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        return self.add(pod)

    def terminate(self, pod: dict) -> dict:
        pod["metadata"]["deletionTimestamp"] = "2026-11-26T00:00:00Z"
        return self.add(pod)

    def delete(self, pod: dict) -> None:
        self._run(self.api.delete_pod(pod["metadata"]["namespace"], pod["metadata"]["name"]))

    def delete_silently(self, pod: dict) -> None:
        """Remove a pod without any watch event (as if deleted while nobody watched)."""

        async def drop():
            self.api.pods.pop((pod["metadata"]["namespace"], pod["metadata"]["name"]))
            self.api.rv += 1

        self._run(drop())

    # --- faults ---

    def cut_watches(self) -> None:
        self._run(self.api.cut_watches())

    def compact(self) -> None:
        self.loop.call_soon_threadsafe(self.api.compact)

    def fail(self, status: Optional[int]) -> None:
        async def set_status():
            self.api.fail_status = status
            await self.api.cut_watches()

        self._run(set_status())

    def down(self) -> None:
        async def close():
            await self.api.cut_watches()
            await self.server.__aexit__(None, None, None)

        self._run(close())

    def up(self) -> None:
        async def reopen():
            self.server = Server(self.api, port=self.port)
            await self.server.__aenter__()

        self._run(reopen())

    @property
    def watch_requests(self) -> list[dict]:
        return list(self.api.watch_requests)

    @property
    def list_requests(self) -> list[dict]:
        return list(self.api.list_requests)
