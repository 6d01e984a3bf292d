"""Worker lifecycle: registration, health states, circuit breaker, retries,
drain, and the admin API, against fake workers toggled at run time."""

import concurrent.futures
import json
import re
import socket
import time

import pytest
from helpers import post_raw, raw_exchange, request, wait_for

FAST_HEALTH = ["--health-check-interval-secs", "0.2", "--health-check-timeout-secs", "1",
               "--health-failure-threshold", "2", "--health-success-threshold", "2"]


def worker_info(g, url):
    for w in g.workers():
        if w["url"] == url:
            return w
    return None


def status_of(g, url):
    info = worker_info(g, url)
    return info and info["status"]


def test_pending_until_healthy_then_ready(fake_workers, gateway):
    (w,) = fake_workers(1, healthy=False)
    g = gateway(["--worker-urls", w.url, "--worker-startup-check-interval", "0.5"])
    wait_for(lambda: status_of(g, w.url) == "pending", message="pending")
    assert g.get("/readiness").status == 503
    # not routable yet: as on the reference, whose registry has no worker until it is healthy
    assert g.post("/generate", {"text": "x"}).status == 404
    w.set(healthy=True)
    wait_for(lambda: status_of(g, w.url) == "ready", message="ready")
    assert g.post("/generate", {"text": "x"}).status == 200
    assert "Registered worker: " + w.url in g.logs()


def test_registration_timeout_removes_the_worker(fake_workers, gateway):
    (w,) = fake_workers(1, healthy=False)
    g = gateway(["--worker-urls", w.url, "--worker-startup-timeout-secs", "1",
                 "--worker-startup-check-interval", "0.2"])
    wait_for(lambda: worker_info(g, w.url) is None, message="worker dropped")
    assert "Failed to register worker " + w.url in g.logs()


def test_model_info_falls_back_only_on_404(fake_workers, gateway):
    a, b = fake_workers(2)
    a.set(model_info_status=404, model_id="model-a")
    b.set(model_info_status=500, model_id="model-b")
    g = gateway(["--worker-urls", a.url, b.url], wait_workers=2)
    assert a.stats.requests.get("/model_info") == 1 and a.stats.requests.get("/get_model_info") == 1
    assert b.stats.requests.get("/model_info") == 1 and "/get_model_info" not in b.stats.requests
    assert a.stats.requests.get("/server_info") == 1 and a.stats.requests.get("/v1/models") == 1
    info = {w["url"]: w for w in g.workers()}
    assert info[a.url]["model_id"] == "model-a" and info[b.url]["model_id"] == "model-b"


def test_server_info_fallback_and_model_id_sources(fake_workers, gateway):
    (w,) = fake_workers(1, server_info_status=404, model_id="served-name")
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    assert w.stats.requests.get("/get_server_info") == 1
    assert g.workers()[0]["model_id"] == "served-name"


def test_health_state_transitions(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, *FAST_HEALTH], wait_workers=1)
    w.set(healthy=False)
    wait_for(lambda: status_of(g, w.url) == "not_ready", message="not_ready")
    assert g.post("/generate", {"text": "x"}).status == 503
    assert g.get("/readiness").status == 503
    # 3 x failure_threshold more failures: failed (and, better than the
    # reference, still probed)
    wait_for(lambda: status_of(g, w.url) == "failed", message="failed")
    assert worker_info(g, w.url)["is_healthy"] is False
    w.set(healthy=True)
    wait_for(lambda: status_of(g, w.url) == "ready", message="recovered")
    assert g.post("/generate", {"text": "x"}).status == 200
    text = g.metrics()
    assert re.search(r'smg_worker_health_checks_total\{result="failure",worker_type="regular"\} \d', text)
    assert re.search(r'smg_worker_health\{worker="%s"\} 1\.0' % re.escape(w.url), text)


def test_remove_unhealthy_workers(fake_workers, gateway):
    a, b = fake_workers(2)
    g = gateway(["--worker-urls", a.url, b.url, "--remove-unhealthy-workers", *FAST_HEALTH], wait_workers=2)
    a.set(healthy=False)
    wait_for(lambda: worker_info(g, a.url) is None, message="unhealthy worker removed")
    assert worker_info(g, b.url)["status"] == "ready"
    assert "Removed worker: " + a.url in g.logs()


def test_disable_health_check(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--disable-health-check", *FAST_HEALTH], wait_workers=1)
    before = w.stats.health_checks
    w.set(healthy=False)
    time.sleep(1.0)  # several intervals: nothing may probe the worker
    assert w.stats.health_checks == before
    assert status_of(g, w.url) == "ready"


def test_circuit_breaker_opens_half_opens_and_closes(fake_workers, gateway):
    bad, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", bad.url, good.url, "--disable-retries",
                 "--cb-failure-threshold", "2", "--cb-success-threshold", "2", "--cb-timeout-duration-secs", "1",
                 "--disable-health-check"], wait_workers=2)
    bad.set(fail_status=500)
    statuses = [g.post("/generate", {"text": "x"}).status for _ in range(6)]
    assert statuses.count(500) == 2  # two failures open the breaker; then only the good worker
    cb = re.compile(r'smg_worker_cb_state\{worker="%s"\} (\d)' % re.escape(bad.url))
    assert cb.search(g.metrics()).group(1) == "1"
    assert all(g.post("/generate", {"text": "x"}).status == 200 for _ in range(4))
    bad.set(fail_status=0)

    def closed_again():
        # after the timeout the breaker lets requests through (half-open);
        # two successes close it
        assert g.post("/generate", {"text": "x"}).status == 200
        return cb.search(g.metrics()).group(1) == "0"

    wait_for(closed_again, interval=0.1, message="breaker closed again")
    text = g.metrics()
    for frm, to in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert re.search(r'smg_worker_cb_transitions_total\{from="%s",to="%s",worker="%s"\} 1\.0'
                         % (frm, to, re.escape(bad.url)), text), (frm, to)


def test_retry_lands_on_a_healthy_worker(fake_workers, gateway):
    bad, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", bad.url, good.url, "--retry-initial-backoff-ms", "1",
                 "--disable-health-check"], wait_workers=2)
    bad.set(fail_status=503)
    for i in range(6):
        r = g.post("/generate", {"text": f"x{i}"})
        assert r.status == 200
        assert r.headers["x-smg-routed-worker-id"] == good.url
    assert bad.stats.generation_requests >= 1
    assert re.search(r'smg_worker_retries_total\{endpoint="generate",worker_type="regular"\} [1-9]', g.metrics())


def test_retries_exhausted_return_the_last_answer(fake_workers, gateway):
    (w,) = fake_workers(1, fail_status=503)
    g = gateway(["--worker-urls", w.url, "--retry-max-retries", "3", "--retry-initial-backoff-ms", "1",
                 "--disable-circuit-breaker"], wait_workers=1)
    r = g.post("/generate", {"text": "x"})
    assert r.status == 503
    assert w.stats.generation_requests == 3
    g2_requests = w.stats.generation_requests
    w.set(fail_status=400)  # not retryable
    assert g.post("/generate", {"text": "x"}).status == 400
    assert w.stats.generation_requests == g2_requests + 1


def test_disable_retries(fake_workers, gateway):
    bad, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", bad.url, good.url, "--disable-retries",
                 "--disable-circuit-breaker"], wait_workers=2)
    bad.set(fail_status=503)
    statuses = sorted(g.post("/generate", {"text": "x"}).status for _ in range(4))
    assert statuses == [200, 200, 503, 503]


def test_no_retry_once_streaming_began(fake_workers, gateway):
    a, b = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", a.url, b.url], wait_workers=2)
    for w in (a, b):
        w.set(stream_chunks=5, drop_after_chunks=2)
    data = raw_exchange(g.port, post_raw("/generate", json.dumps({"text": "x", "stream": True}).encode()))
    assert data.startswith(b"HTTP/1.1 200")
    # ended with an error event, not completed elsewhere
    assert data.count(b"data: ") == 4 and b'"upstream_error"' in data and data.endswith(b"0\r\n\r\n")
    assert a.stats.generation_requests + b.stats.generation_requests == 1


def test_drained_worker_finishes_its_stream_before_removal(fake_workers, gateway):
    a, b = fake_workers(2)
    a.set(stream_chunks=10, stream_interval=0.2)
    g = gateway(["--policy", "round_robin", "--worker-urls", a.url, b.url], wait_workers=2)
    body = json.dumps({"text": "x", "stream": True}).encode()
    wid = worker_info(g, a.url)["id"]
    for _ in range(2):  # round robin: one of two consecutive streams comes from worker a
        s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        s.sendall(post_raw("/generate", body))
        head = s.recv(4096)
        if a.url.encode() in head:
            break
        s.close()
    with s:
        r = request(g.port, "DELETE", f"/workers/{wid}")
        assert r.status == 202 and r.json()["worker_id"] == wid
        assert status_of(g, a.url) == "draining"
        # no new requests reach a draining worker
        before = a.stats.generation_requests
        for _ in range(4):
            assert g.post("/generate", {"text": "y"}).headers["x-smg-routed-worker-id"] == b.url
        assert a.stats.generation_requests == before
        data = head
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            assert chunk, "stream cut during drain"
            data += chunk
        assert data.count(b"data: ") == 11
    wait_for(lambda: worker_info(g, a.url) is None, message="drained worker removed")


def test_drain_timeout_bounds_the_wait(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=1000, stream_interval=0.05)
    g = gateway(["--worker-urls", w.url, "--drain-timeout-secs", "1"], wait_workers=1)
    body = json.dumps({"text": "x", "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    with s:
        s.sendall(post_raw("/generate", body))
        s.recv(4096)
        wid = worker_info(g, w.url)["id"]
        assert request(g.port, "DELETE", f"/workers/{wid}").status == 202
        wait_for(lambda: worker_info(g, w.url) is None, timeout=5, message="removed after the drain timeout")


def test_idle_worker_is_removed_at_once(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    wid = worker_info(g, w.url)["id"]
    assert request(g.port, "DELETE", f"/workers/{wid}").status == 202
    wait_for(lambda: worker_info(g, w.url) is None, timeout=1, message="removed without waiting")


def test_admin_add_worker(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway([])
    r = g.post("/workers", {"url": w.url, "labels": {"team": "a"}})
    assert r.status == 202
    body = r.json()
    assert body["status"] == "accepted" and body["url"] == w.url
    assert r.headers["location"] == f"/workers/{body['worker_id']}" == body["location"]
    wait_for(lambda: status_of(g, w.url) == "ready", message="added worker ready")
    info = g.get(body["location"]).json()
    # the admin's labels, over those from the engine's info
    assert info["labels"]["team"] == "a" and info["labels"]["served_model_name"] == "fake-model"
    assert g.post("/generate", {"text": "x"}).status == 200
    r = g.post("/workers", {"url": w.url})
    assert r.status == 409 and r.json()["code"] == "WORKER_ALREADY_EXISTS"


@pytest.mark.parametrize("body, fragment", [
    ({"url": "not a url"}, "url"),
    ({"url": "ftp://h:1"}, "url"),
    ({"url": "http://h:1/path"}, "url"),
    ({}, "url"),
    ({"url": "http://h:1", "worker_type": "prefill"}, "pd-disaggregation"),
    ({"url": "http://h:1", "worker_type": "gpu"}, "worker_type"),
    ({"url": "http://h:1", "bootstrap_port": "x"}, "bootstrap_port"),
    ({"url": "http://h:1", "labels": ["a"]}, "labels"),
])
def test_admin_add_worker_rejects_bad_input(gateway, body, fragment):
    g = gateway([])
    r = g.post("/workers", body)
    assert r.status == 400
    assert r.json()["code"] == "BAD_REQUEST" and fragment in r.json()["error"]
    assert g.workers() == []
    assert g.post("/workers", b"{broken").status == 400


def test_admin_delete_unknown(gateway):
    g = gateway([])
    assert request(g.port, "DELETE", "/workers/00000000-0000-0000-0000-000000000000").status == 404
    assert request(g.port, "DELETE", "/workers/xyz").status == 400


def test_concurrent_add_and_remove_of_one_url(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway([])
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: g.post("/workers", {"url": w.url}).status, range(16)))
    assert statuses.count(202) == 1 and statuses.count(409) == 15
    wait_for(lambda: status_of(g, w.url) == "ready", message="ready")

    def churn(i):
        info = worker_info(g, w.url)
        if info and i % 2:
            return request(g.port, "DELETE", f"/workers/{info['id']}").status
        return g.post("/workers", {"url": w.url}).status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(churn, range(40)))
    assert set(results) <= {202, 404, 409}
    # whatever the interleaving: at most one live entry for the URL, and it settles
    g.post("/workers", {"url": w.url})

    def settled():
        entries = [x for x in g.workers() if x["url"] == w.url]
        live = [x for x in entries if x["status"] != "draining"]
        return len(live) == 1 and live[0]["status"] == "ready" and len(entries) == 1

    wait_for(settled, message="one ready entry")
    assert g.post("/generate", {"text": "x"}).status == 200


def test_admin_api_key_separate_from_serving_key(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--api-key", "serve", "--admin-api-key", "admin"])
    assert g.get("/workers", headers={"authorization": "Bearer serve"}).status == 401
    assert g.get("/workers", headers={"authorization": "Bearer admin"}).status == 200
    wait_for(lambda: g.get("/readiness").status == 200, message="ready")
    assert g.post("/generate", {"text": "x"}, headers={"authorization": "Bearer serve"}).status == 200
    assert g.post("/generate", {"text": "x"}, headers={"authorization": "Bearer admin"}).status == 401


def test_pool_size_metric(fake_workers, gateway):
    ws = fake_workers(3)
    g = gateway(["--worker-urls", *[w.url for w in ws]], wait_workers=3)
    assert 'smg_worker_pool_size{connection_mode="http",model="fake-model",worker_type="regular"} 3.0' in g.metrics()


def test_worker_startup_delay_postpones_the_first_check(fake_workers, gateway):
    (w,) = fake_workers(1)
    t0 = time.monotonic()
    g = gateway(["--worker-urls", w.url, "--worker-startup-delay", "1.5"])
    wait_for(lambda: status_of(g, w.url) == "ready", message="registered after the delay")
    assert time.monotonic() - t0 >= 1.5
    assert w.stats.health_checks >= 1


def test_patch_and_put_a_worker(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    wid = g.workers()[0]["id"]
    r = request(g.port, "PATCH", f"/workers/{wid}", {"labels": {"zone": "a"}, "priority": 7, "cost": 2.5})
    assert r.status == 202 and r.json()["worker_id"] == wid
    info = g.get(f"/workers/{wid}").json()
    assert info["labels"]["zone"] == "a" and (info["priority"], info["cost"]) == (7, 2.5)
    assert request(g.port, "PATCH", f"/workers/{wid}", {"labels": {"zone": None}}).status == 202
    assert "zone" not in g.get(f"/workers/{wid}").json()["labels"]
    r = request(g.port, "PATCH", f"/workers/{wid}", {"url": "http://elsewhere:1"})
    assert r.status == 400 and r.json()["code"] == "BAD_REQUEST"
    assert request(g.port, "PATCH", f"/workers/{wid}", {"priority": -1}).status == 400
    missing = "00000000-0000-0000-0000-000000000000"
    assert request(g.port, "PATCH", f"/workers/{missing}", {}).status == 404
    # PUT replaces the worker (same URL) with a new registration
    r = request(g.port, "PUT", f"/workers/{wid}", {"labels": {"tier": "gpu"}})
    assert r.status == 202
    new_id = r.json()["worker_id"]
    assert new_id != wid
    wait_for(lambda: [(x["id"], x["status"]) for x in g.workers()] == [(new_id, "ready")], message="replaced")
    assert g.get(f"/workers/{new_id}").json()["labels"]["tier"] == "gpu"
    assert request(g.port, "PUT", f"/workers/{new_id}", {"url": "http://127.0.0.1:1"}).status == 400
    assert g.post("/generate", {"text": "x"}).status == 200


def test_a_long_prompt_is_retried_by_its_text_read_again_from_the_body(fake_workers, gateway):
    """A routing text over 64 Ki characters is not kept beside the body while
    the call lasts; a retry reads it from the body again and routes by it."""
    a, b = fake_workers(2)
    g = gateway(["--policy", "cache_aware", "--worker-urls", a.url, b.url, "--retry-initial-backoff-ms", "1",
                 "--disable-circuit-breaker"], wait_workers=2)
    prompt = "[long] " + "p" * 100_000
    first = g.post("/generate", {"text": prompt})
    assert first.status == 200
    owner, other = (a, b) if first.headers["x-smg-routed-worker-id"] == a.url else (b, a)
    owner.set(fail_status=503, fail_count=1)
    again = g.post("/generate", {"text": prompt + " and more"})
    assert again.status == 200
    assert again.headers["x-smg-routed-worker-id"] == other.url
    assert owner.stats.generation_requests == 2 and other.stats.generation_requests == 1
    # the retry was routed by the prompt too: cache_aware counted it (its
    # owner found, then avoided); a retry without it would count nothing
    decisions = dict(re.findall(r'smg_cache_aware_decisions_total\{decision="(\w+)",[^}]*\} (\S+)', g.metrics()))
    assert (float(decisions["miss"]), float(decisions["hit"])) == (1, 2)
