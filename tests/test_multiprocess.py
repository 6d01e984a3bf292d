"""--workers N: one control plane, N data-plane processes on one port.

Every request here opens a new connection, so the kernel (SO_REUSEPORT)
spreads them over the processes; the per-process request counters in
/metrics show that every process took part."""

import collections
import concurrent.futures
import os
import re
import signal
import socket

from helpers import post_raw, read_until_close, request, wait_for


def process_requests(g) -> dict[str, float]:
    """smg_dataplane_requests_total per process index."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'smg_dataplane_requests_total\{process="(\d+)"\} (\S+)', g.metrics())}


def dataplane_pids(g) -> dict[int, int]:
    """Data-plane process index -> pid, from the supervisor's children."""
    pids = {}
    with open(f"/proc/{g.proc.pid}/task/{g.proc.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"SMG_DATAPLANE="):
                index = int(re.search(rb'"index":(\d+)', item).group(1))
                pids[index] = pid
    return pids


def who(resp) -> str:
    return resp.headers["x-smg-routed-worker-id"]


def test_processes_share_the_port_and_agree_on_prefixes(fake_workers, gateway):
    workers = fake_workers(4)
    g = gateway(["--workers", "2", "--worker-urls", *[w.url for w in workers]], wait_workers=4)
    wait_for(lambda: len(dataplane_pids(g)) == 2, message="two data-plane processes")
    prefixes = [f"[{i}] system prompt of tenant {i}: " + f"rule {i}; " * 40 for i in range(12)]
    owners = collections.defaultdict(collections.Counter)
    for round_ in range(6):
        for i, pre in enumerate(prefixes):
            r = g.post("/generate", {"text": pre + f"question {round_}"})
            assert r.status == 200
            owners[i][who(r)] += 1
    assert all(len(c) == 1 for c in owners.values()), owners
    per_process = process_requests(g)
    assert set(per_process) == {"0", "1"}
    assert all(n > 0 for n in per_process.values()), per_process


def test_metrics_are_the_host_totals(fake_workers, gateway):
    workers = fake_workers(3)
    g = gateway(["--workers", "2", "--policy", "round_robin", "--worker-urls", *[w.url for w in workers]],
                wait_workers=3)
    for w in workers:
        w.reset_stats()
    n = 60
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: g.post("/generate", {"text": f"q{i}"}).status, range(n)))
    assert statuses == [200] * n
    text = g.metrics()
    received = {w.url: w.stats.generation_requests for w in workers}
    assert sum(received.values()) == n
    for url, count in received.items():
        assert re.search(rf'smg_worker_requests_total\{{model="fake-model",worker="{re.escape(url)}"\}} {count}\.0',
                         text), (url, count)
    assert re.search(rf'smg_http_requests_total\{{method="POST",path="/generate"\}} {n}\.0', text)
    assert re.search(rf'smg_http_responses_total\{{error_code="",path="/generate",status_code="200"\}} {n}\.0', text)
    assert re.search(rf'smg_http_request_duration_seconds_count\{{method="POST",path="/generate"\}} {n}\.0', text)
    assert f'smg_router_requests_total{{backend_type="regular",connection_mode="http",endpoint="generate",' \
           f'model="unknown",router_type="http",streaming="false"}} {n}.0' in text
    assert f'smg_router_upstream_responses_total{{error_code="",router_type="http",status_code="200"}} {n}.0' in text
    assert "smg_dataplane_processes 2.0" in text
    per_process = process_requests(g)
    assert all(v > 0 for v in per_process.values()), per_process


def test_admin_changes_reach_every_process(fake_workers, gateway):
    old, new = fake_workers(2)
    g = gateway(["--workers", "2", "--worker-urls", old.url], wait_workers=1)
    r = g.post("/workers", {"url": new.url})
    assert r.status == 202
    new_id = r.json()["worker_id"]
    wait_for(lambda: any(w["id"] == new_id and w["status"] == "ready" for w in g.workers()), message="new worker ready")
    old_id = next(w["id"] for w in g.workers() if w["url"] == old.url)
    assert request(g.port, "DELETE", f"/workers/{old_id}").status == 202
    # from the moment the removal is acknowledged no process routes to the old worker
    old.reset_stats()
    before = process_requests(g)
    for i in range(40):
        r = g.post("/generate", {"text": f"after the removal {i}"})
        assert r.status == 200 and who(r) == new.url
    assert old.stats.generation_requests == 0
    after = process_requests(g)
    assert all(after[p] > before.get(p, 0) for p in ("0", "1")), (before, after)
    wait_for(lambda: [w["url"] for w in g.workers()] == [new.url], message="the old worker removed")


def test_drain_waits_for_requests_in_every_process(fake_workers, gateway):
    (slow,) = fake_workers(1)
    g = gateway(["--workers", "2", "--worker-urls", slow.url], wait_workers=1)
    slow.set(response_delay=1.5)
    slow_id = next(w["id"] for w in g.workers() if w["url"] == slow.url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(g.post, "/generate", {"text": f"q{i}"}, None, 20) for i in range(8)]
        # the host-wide in-flight count, from every process
        wait_for(lambda: next(w["load"] for w in g.workers() if w["id"] == slow_id) == 8,
                 message="8 requests in flight on the slow worker")
        assert request(g.port, "DELETE", f"/workers/{slow_id}").status == 202
        # draining: still listed while its requests run
        assert any(w["id"] == slow_id and w["status"] == "draining" for w in g.workers())
        assert all(f.result().status == 200 for f in futures)
    wait_for(lambda: all(w["id"] != slow_id for w in g.workers()), message="drained worker removed")
    assert "still had requests in flight" not in g.logs()


def test_a_killed_process_is_restarted_and_its_queued_connections_are_served(fake_workers, gateway):
    workers = fake_workers(2)
    g = gateway(["--workers", "2", "--worker-urls", *[w.url for w in workers]], wait_workers=2)
    pids = wait_for(lambda: (p := dataplane_pids(g)) and len(p) == 2 and p, message="two data-plane processes")
    victim = pids[0]
    os.kill(victim, signal.SIGSTOP)
    # connections the kernel hands to the stopped process's socket wait in its queue
    socks = []
    try:
        for i in range(24):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=20)
            s.sendall(post_raw("/generate", b'{"text": "queued %d"}' % i, b"Connection: close\r\n"))
            socks.append(s)
        os.kill(victim, signal.SIGKILL)
        answers = [read_until_close(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), [a[:60] for a in answers]
    new_pids = wait_for(lambda: (p := dataplane_pids(g)) and len(p) == 2 and p, message="process 0 back")
    assert new_pids[0] != victim and new_pids[1] == pids[1]
    assert re.search(r"data-plane process 0 \(pid %d\) exited with signal 9; starting it again" % victim, g.logs())
    assert 'smg_dataplane_restarts_total{process="0"} 1.0' in g.metrics()
    # the new process knows the workers
    assert all(g.post("/generate", {"text": f"after {i}"}).status == 200 for i in range(10))


def test_sigterm_drains_every_process(fake_workers, gateway):
    workers = fake_workers(2, stream_chunks=6, stream_interval=0.2)
    g = gateway(["--workers", "2", "--worker-urls", *[w.url for w in workers]], wait_workers=2)
    pids = wait_for(lambda: (p := dataplane_pids(g)) and len(p) == 2 and p, message="two data-plane processes")
    body = b'{"text": "stream me", "stream": true}'
    socks = []
    for i in range(6):
        s = socket.create_connection(("127.0.0.1", g.port), timeout=20)
        s.sendall(post_raw("/generate", body, b"Connection: close\r\n"))
        socks.append(s)
    wait_for(lambda: sum(w.stats.generation_requests for w in workers) >= 6, message="streams started")
    g.proc.send_signal(signal.SIGTERM)
    try:
        answers = [read_until_close(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    for a in answers:
        assert a.startswith(b"HTTP/1.1 200") and a.count(b"data: ") >= 6 and a.endswith(b"0\r\n\r\n"), a[-200:]
    assert g.proc.wait(20) == 0
    for pid in pids.values():
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid), message=f"process {pid} gone")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_workers_auto_and_bad_values(tmp_path):
    from helpers import run_cli

    r = run_cli(["--workers", "0"])
    assert r.returncode == 2 and "--workers" in r.stderr and "1 or more" in r.stderr
    r = run_cli(["--workers", "many"])
    assert r.returncode == 2 and "'auto'" in r.stderr
    from smg.supervisor import available_cpus

    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_discovery_feeds_every_process(k8s, pod_workers, gateway):
    """One Kubernetes watch in the control plane; pods appear in and leave
    every data-plane process's routing."""
    from k8s_api import make_pod

    port, (w0, w1) = pod_workers(2)
    labels = {"app": "sglang-worker"}
    p0 = k8s.add(make_pod("sglang-worker-0", w0.host, labels))
    g = gateway(["--workers", "2", "--policy", "round_robin", "--service-discovery", "--selector",
                 "app=sglang-worker", "--service-discovery-namespace", "inference",
                 "--service-discovery-port", str(port)], env=k8s.env)
    wait_for(lambda: [w["url"] for w in g.workers() if w["status"] == "ready"] == [w0.url], message="pod 0")
    k8s.add(make_pod("sglang-worker-1", w1.host, labels))
    wait_for(lambda: sorted(w["url"] for w in g.workers() if w["status"] == "ready") == sorted([w0.url, w1.url]),
             message="pod 1")
    before = process_requests(g)
    served = collections.Counter(who(g.post("/generate", {"text": f"q{i}"})) for i in range(40))
    assert set(served) == {w0.url, w1.url}
    after = process_requests(g)
    assert all(after[p] > before.get(p, 0) for p in ("0", "1"))
    k8s.delete(p0)
    wait_for(lambda: [w["url"] for w in g.workers()] == [w1.url], message="pod 0 gone")
    assert {who(g.post("/generate", {"text": f"r{i}"})) for i in range(20)} == {w1.url}
    # one watch for the host, not one per process
    assert g.logs().count("Watching pods in namespace") == 1


def test_workers_show_the_data_planes_circuit_breakers_and_errors(fake_workers, gateway):
    """With --workers N the breakers run in the data-plane processes: GET
    /workers shows the most open one and the latest error among them."""
    (w,) = fake_workers(1, fail_status=500)
    g = gateway(["--workers", "2", "--worker-urls", w.url, "--cb-failure-threshold", "1", "--retry-max-retries", "1",
                 "--disable-health-check"], wait_workers=1)
    assert g.post("/generate", {"text": "fails"}).status == 500
    info = g.workers()[0]
    assert info["circuit_breaker"]["state"] == "open"
    assert info["last_error"]["message"] == "answered 500 to /generate"
