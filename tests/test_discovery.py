"""Kubernetes service discovery end to end: the real `smg` command against an
emulated API server (kmock, tests/k8s_api.py) and fake workers on loopback
pod IPs."""

import re
import threading
import time

from helpers import wait_for
from k8s_api import make_pod

LABELS = {"app": "sglang-worker"}
NS = "inference"


def discovery_args(port, *extra):
    return ["--service-discovery", "--selector", "app=sglang-worker", "--service-discovery-namespace", NS,
            "--service-discovery-port", str(port), *extra]


def urls(g):
    return sorted(w["url"] for w in g.workers())


def ready_urls(g):
    return sorted(w["url"] for w in g.workers() if w["status"] == "ready")


def sync_passes(g):
    m = re.search(r'smg_discovery_sync_duration_seconds_count\{source="kubernetes"\} (\S+)', g.metrics())
    return float(m.group(1)) if m else 0.0


def change_and_sync(g, change):
    """Make a change in the API server, then wait until the gateway has
    run a discovery pass after it (a negative check needs that, not a sleep)."""
    before = sync_passes(g)
    change()
    wait_for(lambda: sync_passes(g) > before, message="a discovery pass after the change")


def wait_urls(g, expected, ready=True, message="workers"):
    expected = sorted(expected)
    return wait_for(lambda: (ready_urls(g) if ready else urls(g)) == expected, message=f"{message}: {expected}")


class Traffic:
    """Requests sent continuously in the background; every answer must be 200."""

    def __init__(self, g):
        self.g = g
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                self.statuses.append(self.g.post("/generate", {"text": "steady traffic"}, timeout=10).status)
            except Exception as e:  # a dropped request counts as a failure
                self.statuses.append(repr(e))
            time.sleep(0.01)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(15)
        assert self.statuses, "no traffic was sent"
        failed = [s for s in self.statuses if s != 200]
        assert not failed, f"{len(failed)} of {len(self.statuses)} requests failed: {failed[:5]}"


def test_lifecycle_of_discovered_pods(k8s, pod_workers, gateway):
    port, (w0, w1, w2, w3) = pod_workers(4)
    p0 = k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    k8s.add(make_pod("decoy-other-label", w2.host, {"app": "something-else"}))
    k8s.add(make_pod("decoy-other-ns", w3.host, LABELS, namespace="elsewhere"))
    g = gateway(discovery_args(port), env=k8s.env)
    # initial sync (the pod existed before the gateway)
    wait_urls(g, [w0.url], message="initial sync")
    logs = g.logs()
    assert "Watching pods in namespace 'inference' with selector 'app=sglang-worker'" in logs
    assert f"Discovered new pod: sglang-worker-0 ({w0.host}:{port})" in logs
    assert f"Registered worker: {w0.url}" in logs
    info = g.workers()[0]
    assert info["labels"]["smg.ai/pod-name"] == "sglang-worker-0"
    assert info["labels"]["smg.ai/pod-uid"] == p0["metadata"]["uid"]
    assert info["labels"]["smg.ai/pod-namespace"] == NS

    with Traffic(g):
        # a pod is added, not ready yet: no worker until it is Ready
        p1 = None

        def add_unready():
            nonlocal p1
            p1 = k8s.add(make_pod("sglang-worker-1", w1.host, LABELS, ready=False))

        change_and_sync(g, add_unready)
        assert urls(g) == [w0.url]
        k8s.set_ready(p1, True)
        wait_urls(g, [w0.url, w1.url], message="pod became ready")
        # a pod turning unready keeps its worker: health checks own that state
        change_and_sync(g, lambda: k8s.set_ready(p1, False))
        assert urls(g) == sorted([w0.url, w1.url])
        k8s.set_ready(p1, True)
        # terminating: drained at once
        k8s.terminate(p1)
        wait_urls(g, [w0.url], ready=False, message="terminating pod drained")
        k8s.delete(p1)
        # re-created with the same IP and a new uid: a new worker
        p1b = k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
        wait_for(lambda: any(w["labels"].get("smg.ai/pod-uid") == p1b["metadata"]["uid"] and w["status"] == "ready"
                             for w in g.workers()), message="re-created pod registered")
        old = p1["metadata"]["uid"]
        wait_for(lambda: all(w["labels"].get("smg.ai/pod-uid") != old for w in g.workers()), message="old uid gone")
        # deleted
        k8s.delete(p0)
        wait_urls(g, [w1.url], ready=False, message="deleted pod removed")
    # the decoys never became workers
    assert w2.url not in urls(g) and w3.url not in urls(g)
    assert w2.stats.generation_requests == 0 and w3.stats.generation_requests == 0
    text = g.metrics()
    assert 'smg_discovery_workers_discovered{source="kubernetes"} 1.0' in text
    assert re.search(r'smg_discovery_registrations_total\{result="success",source="kubernetes"\} 3\.0', text)
    assert re.search(r'smg_discovery_deregistrations_total\{reason="terminating",source="kubernetes"\} 1\.0', text)
    assert re.search(r'smg_discovery_deregistrations_total\{reason="deleted",source="kubernetes"\} 1\.0', text)
    assert 'smg_discovery_sync_duration_seconds_count{source="kubernetes"}' in text


def test_watch_cut_resumes_without_relisting(k8s, pod_workers, gateway):
    port, (w0, w1) = pod_workers(2)
    k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    g = gateway(discovery_args(port), env=k8s.env)
    wait_urls(g, [w0.url])
    lists = len(k8s.list_requests)
    watches = len(k8s.watch_requests)
    k8s.cut_watches()
    wait_for(lambda: len(k8s.watch_requests) > watches, message="watch re-opened")
    resumed = k8s.watch_requests[-1]
    assert resumed.get("resourceVersion"), resumed  # resumed where it left off
    assert resumed.get("allowWatchBookmarks") == "true" and resumed.get("timeoutSeconds")
    k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
    wait_urls(g, [w0.url, w1.url], message="pod added after the cut")
    assert len(k8s.list_requests) == lists


def test_410_relists_and_drops_pods_deleted_meanwhile(k8s, pod_workers, gateway):
    port, (w0, w1, w2) = pod_workers(3)
    p0 = k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
    g = gateway(discovery_args(port), env=k8s.env)
    wait_urls(g, [w0.url, w1.url])
    lists = len(k8s.list_requests)
    with Traffic(g):
        # while the watch is down, a pod vanishes and the history is compacted
        k8s.fail(500)
        k8s.delete_silently(p0)
        k8s.add(make_pod("sglang-worker-2", w2.host, LABELS))
        k8s.compact()
        k8s.fail(None)
        # the resume gets 410 Gone, the gateway lists again and diffs
        wait_urls(g, [w1.url, w2.url], ready=False, message="state after re-list")
    assert len(k8s.list_requests) > lists
    assert "410 Gone" in g.logs()


def test_api_server_down_keeps_workers(k8s, pod_workers, gateway):
    port, (w0, w1) = pod_workers(2)
    k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    g = gateway(discovery_args(port), env=k8s.env)
    wait_urls(g, [w0.url])
    with Traffic(g):
        k8s.down()
        # two failed attempts in a row
        wait_for(lambda: g.logs().count("Kubernetes API unreachable") >= 2, message="unreachable, retried")
        assert ready_urls(g) == [w0.url]  # an unreachable API server never empties the worker set
        assert "Retrying (Retry(" not in g.logs()  # one smg line per attempt, no urllib3 chatter
        k8s.up()
        k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
        wait_urls(g, [w0.url, w1.url], message="recovered")


def test_forbidden_names_the_missing_rbac_rule(k8s, pod_workers, gateway):
    port, (w0,) = pod_workers(1)
    k8s.fail(403)
    g = gateway(discovery_args(port), env=k8s.env)
    wait_for(lambda: "forbidden to list/watch pods in namespace 'inference'" in g.logs(), message="RBAC line")
    line = [l for l in g.logs().splitlines() if "RBAC" in l]
    assert len(line) == 1 and "get, list and watch on pods" in line[0]
    k8s.fail(None)
    k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    wait_urls(g, [w0.url], message="works once RBAC is fixed")


def test_unauthorized_reloads_credentials(k8s, pod_workers, gateway):
    port, (w0,) = pod_workers(1)
    k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    g = gateway(discovery_args(port), env=k8s.env)
    wait_urls(g, [w0.url])
    k8s.fail(401)
    wait_for(lambda: "401 Unauthorized: reloading credentials" in g.logs(), message="401 handled")
    k8s.fail(None)
    k8s.cut_watches()
    w1_port, (w1,) = pod_workers(1, port=port)
    k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
    wait_urls(g, [w0.url, w1.url], message="works after the token reload")


def test_pd_discovery_classifies_pods_with_bootstrap_ports(k8s, pod_workers, gateway):
    port, (pf0, pf1, dc0, other) = pod_workers(4)
    k8s.add(make_pod("sglang-prefill-0", pf0.host, {"app": "sglang", "role": "prefill"},
                     annotations={"sglang.ai/bootstrap-port": "9001"}))
    k8s.add(make_pod("sglang-prefill-1", pf1.host, {"app": "sglang", "role": "prefill"}))
    k8s.add(make_pod("sglang-decode-0", dc0.host, {"app": "sglang", "role": "decode"}))
    k8s.add(make_pod("sglang-router", other.host, {"app": "sglang", "role": "router"}))
    g = gateway(["--service-discovery", "--pd-disaggregation", "--prefill-selector", "app=sglang", "role=prefill",
                 "--decode-selector", "app=sglang", "role=decode", "--service-discovery-namespace", NS,
                 "--service-discovery-port", str(port)], env=k8s.env)
    wait_for(lambda: len(ready_urls(g)) == 3, message="three PD workers")
    by_url = {w["url"]: w for w in g.workers()}
    assert by_url[pf0.url]["worker_type"] == "prefill" and by_url[pf0.url]["bootstrap_port"] == 9001
    assert by_url[pf1.url]["worker_type"] == "prefill" and by_url[pf1.url]["bootstrap_port"] is None
    assert by_url[dc0.url]["worker_type"] == "decode"
    assert other.url not in by_url
    body = g.get("/workers").json()
    assert body["stats"] == {"prefill_count": 2, "decode_count": 1, "regular_count": 0}
    # the server-side selector is what both roles require; roles are checked here
    assert k8s.list_requests[0]["labelSelector"] == "app=sglang"


def test_selector_syntax_all_namespaces_and_model_id(k8s, pod_workers, gateway):
    port, (a, b, c, d) = pod_workers(4)
    k8s.add(make_pod("a", a.host, {"app": "sglang", "environment": "production", "tier": "gpu"}, namespace="team-a"))
    k8s.add(make_pod("b", b.host, {"app": "sglang", "environment": "production", "tier": "gpu"}, namespace="team-b"))
    k8s.add(make_pod("c", c.host, {"app": "sglang", "environment": "staging", "tier": "gpu"}, namespace="team-a"))
    k8s.add(make_pod("d", d.host, {"app": "sglang", "environment": "production", "tier": "gpu", "canary": "1"},
                     namespace="team-a"))
    g = gateway(["--service-discovery", "--selector", "app=sglang", "environment in (production)", "tier!=cpu",
                 "!canary", "--service-discovery-port", str(port), "--model-id-from", "namespace"], env=k8s.env)
    wait_urls(g, [a.url, b.url], message="matching pods in every namespace")
    assert {w["model_id"] for w in g.workers()} == {"team-a", "team-b"}
    assert "Watching pods in all namespaces" in g.logs()
    r = g.post("/generate", {"model": "team-b", "text": "x"})
    assert r.status == 200 and r.headers["x-smg-routed-worker-id"] == b.url


def test_worker_ports_annotation(k8s, gateway):
    from smg.testing import FakeWorker

    ws = [FakeWorker("127.0.0.9", 0).start() for _ in range(2)]
    try:
        ports = ",".join(str(w.port) for w in ws)
        k8s.add(make_pod("multi", "127.0.0.9", LABELS, annotations={"smg.ai/worker-ports": ports}))
        k8s.add(make_pod("bad-annotation", "127.0.0.10", LABELS, annotations={"smg.ai/worker-ports": "80,abc"}))
        g = gateway(discovery_args(ws[0].port), env=k8s.env)
        wait_for(lambda: sorted(ready_urls(g)) == sorted(w.url for w in ws), message="one worker per port")
        assert "invalid smg.ai/worker-ports annotation '80,abc'" in g.logs()
    finally:
        for w in ws:
            w.stop()


def test_manual_workers_are_never_touched(k8s, pod_workers, fake_workers, gateway):
    """Workers discovery did not add are not its to replace or remove: not a
    manual worker at a pod's address, not one carrying a pod's uid label."""
    port, (w0, w1) = pod_workers(2)
    (static,) = fake_workers(1)
    g = gateway(discovery_args(port, "--worker-urls", static.url), env=k8s.env)
    wait_urls(g, [static.url])
    # a manual worker at the address pod 0 will have, claiming its uid
    r = g.post("/workers", {"url": w0.url, "labels": {"smg.ai/pod-uid": "uid-0"}})
    assert r.status == 202
    manual_id = r.json()["worker_id"]
    wait_urls(g, [static.url, w0.url])
    p0 = k8s.add(make_pod("sglang-worker-0", w0.host, LABELS, uid="uid-0"))
    p1 = k8s.add(make_pod("sglang-worker-1", w1.host, LABELS))
    wait_urls(g, [static.url, w0.url, w1.url], message="pod 1 discovered (so pod 0 was seen too)")
    assert next(w["id"] for w in g.workers() if w["url"] == w0.url) == manual_id
    k8s.delete(p0)
    k8s.delete(p1)
    wait_urls(g, [static.url, w0.url], message="pod 1 removed (so pod 0's deletion was seen too)")
    assert next(w["id"] for w in g.workers() if w["url"] == w0.url) == manual_id


def test_rust_log_enables_discovery_debug(k8s, pod_workers, gateway):
    port, (w0,) = pod_workers(1)
    k8s.add(make_pod("sglang-worker-0", w0.host, LABELS))
    g = gateway(discovery_args(port), env={**k8s.env, "RUST_LOG": "smg::discovery=debug"})
    wait_urls(g, [w0.url])
    assert "[DEBUG] smg.discovery.kubernetes: listed" in g.logs()
    assert "[DEBUG] smg.workers" not in g.logs() and "[DEBUG] smg.health" not in g.logs()


def test_no_kubeconfig_is_a_clear_error(tmp_path):
    from helpers import run_cli

    r = run_cli(["--service-discovery", "--selector", "app=x", "--port", "0", "--prometheus-port", "0"],
                env={"KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path), "KUBERNETES_SERVICE_HOST": ""})
    assert r.returncode == 1
    assert "--service-discovery needs Kubernetes credentials" in r.stderr
