"""Hostile input, overload, faults and shutdown."""

import concurrent.futures
import json
import re
import signal
import socket
import time

import pytest
from helpers import GatewayProcess, post_raw, raw_exchange, read_until_close, request, wait_for
from k8s_api import make_pod


# --- hostile HTTP -----------------------------------------------------------

@pytest.mark.parametrize("name, data", [
    ("content-length with transfer-encoding",
     b"POST /generate HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /workers HTTP/1.1\r\nHost: g\r\n\r\n"),
    ("duplicate content-length",
     b"POST /generate HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nContent-Length: 30\r\n\r\n{}"),
    ("obs-fold", b"GET /health HTTP/1.1\r\nHost: g\r\nX-Folded: a\r\n  b\r\n\r\n"),
    ("transfer-encoding not ending in chunked",
     b"POST /generate HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip\r\n\r\nxx"),
    ("chunk size garbage", b"POST /generate HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nxx\r\n"),
    ("chunk size overflow",
     b"POST /generate HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n"),
    ("space before colon", b"GET /health HTTP/1.1\r\nHost : g\r\n\r\n"),
    ("bare LF in a header value", b"GET /health HTTP/1.1\r\nHost: g\r\nX: a\rb\r\n\r\n"),
    ("binary", bytes(range(256)) * 4),
])
def test_smuggling_and_malformed_requests_are_refused(fake_workers, gateway, name, data):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    out = raw_exchange(g.port, data)
    assert out.startswith(b"HTTP/1.1 400"), (name, out[:200])
    assert out.count(b"HTTP/1.1 ") == 1  # nothing smuggled behind it was answered
    assert w.stats.generation_requests == 0
    assert g.get("/health").status == 200


def test_oversized_request_line_and_headers(gateway):
    g = gateway([])
    out = raw_exchange(g.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: g\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 414")
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\n" + b"X-A: " + b"b" * 66000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431")
    out = raw_exchange(g.port, b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431")


def test_http10_keep_alive_semantics(gateway):
    g = gateway([])
    out = raw_exchange(g.port, b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b"connection: close" in out.lower()
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    with s:
        s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
        s.sendall(b"GET /liveness HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")


def test_slow_body_is_timed_out(gateway):
    g = gateway(["--idle-connection-timeout-secs", "1"])
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    with s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\n{\"te")
        t0 = time.monotonic()
        data = read_until_close(s)
        assert data.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5


def test_thousands_of_idle_and_abandoned_connections(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--idle-connection-timeout-secs", "2", "--header-read-timeout-secs", "2"],
                wait_workers=1)
    socks = []
    try:
        for i in range(2000):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
            if i % 2:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\nX-Partial: ")  # abandoned mid-headers
            socks.append(s)
        # the gateway keeps serving while they sit there
        for _ in range(20):
            assert g.post("/generate", {"text": "x"}).status == 200

        def count():
            m = re.search(r"smg_http_connections_active (\d+)", g.metrics())
            return int(m.group(1))

        assert count() >= 1900
        # and closes them all on its own
        wait_for(lambda: count() <= 1, timeout=15, message="idle and abandoned connections closed")
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("body, code", [
    (b"[1, 2, 3]", "invalid_request"),
    (b'"a string"', "invalid_request"),
    (b"[" * 2000 + b"]" * 2000, "json_parse_error"),
    (b'{"text": ' + b'{"a":' * 1500 + b"1" + b"}" * 1500 + b"}", "json_parse_error"),
    (b'{"text": 5}', "invalid_type"),
    (b'{"text": ["a", 5]}', "invalid_type"),
    (b'{"text": "x", "stream": "yes"}', "invalid_type"),
    (b'{"input_ids": [[1, "a"]]}', "invalid_type"),
    (b'{"text": "\xff\xfe invalid utf-8"}', "json_parse_error"),
    (b'{"model": 7, "text": "x"}', "invalid_type"),
    (b"", "json_parse_error"),
])
def test_wrong_json_bodies_get_4xx_in_the_smg_shape(fake_workers, gateway, body, code):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    r = g.post("/generate", body)
    assert r.status == 400, r
    assert r.json()["error"]["code"] == code and r.headers["x-smg-error-code"] == code
    assert w.stats.generation_requests == 0


@pytest.mark.parametrize("path, body, code, param", [
    ("/v1/chat/completions", {"messages": "hi"}, "invalid_type", "messages"),
    ("/v1/chat/completions", {"messages": [1, 2]}, "invalid_type", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "invalid_type", "messages"),
    ("/v1/chat/completions", {"model": "m"}, "missing_required_parameter", "messages"),
    ("/v1/completions", {"model": "m"}, "missing_required_parameter", "prompt"),
    ("/v1/embeddings", {"input": 3}, "invalid_type", "input"),
    ("/v1/rerank", {"query": ["q"], "documents": []}, "invalid_type", "query"),
])
def test_wrong_types_on_other_routes(fake_workers, gateway, path, body, code, param):
    """OpenAI's codes, with the parameter named (as the reference does)."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    r = g.post(path, body)
    err = r.json()["error"]
    assert r.status == 400 and (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")


# --- overload ---------------------------------------------------------------

def test_max_concurrent_requests_queue_and_429(fake_workers, gateway):
    (w,) = fake_workers(1, response_delay=1.0)
    g = gateway(["--worker-urls", w.url, "--max-concurrent-requests", "2", "--queue-size", "1",
                 "--queue-timeout-secs", "30"], wait_workers=1)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(g.post, "/generate", {"text": f"x{i}"}, None, 30) for i in range(4)]
        results = [f.result() for f in futures]
    statuses = sorted(r.status for r in results)
    assert statuses == [200, 200, 200, 429], statuses
    rejected = next(r for r in results if r.status == 429)
    assert rejected.json()["error"]["code"] == "too_many_requests" and rejected.headers["retry-after"] == "1"
    assert w.stats.max_in_flight == 2  # never more than the limit at the worker
    text = g.metrics()
    assert "smg_admission_inflight 0.0" in text
    assert 'smg_admission_rejected_total{reason="queue_full"} 1.0' in text
    # health and admin routes are not subject to the limit
    assert g.get("/health").status == 200


def test_queue_timeout(fake_workers, gateway):
    (w,) = fake_workers(1, response_delay=3.0)
    g = gateway(["--worker-urls", w.url, "--max-concurrent-requests", "1", "--queue-timeout-secs", "0.5"],
                wait_workers=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(g.post, "/generate", {"text": "a"}, None, 30)
        wait_for(lambda: w.stats.in_flight == 1, message="first in flight")
        t0 = time.monotonic()
        r = g.post("/generate", {"text": "b"}, timeout=30)
        assert r.status == 429 and r.json()["error"]["code"] == "queue_timeout"
        assert time.monotonic() - t0 < 2.5
        assert first.result().status == 200
    assert w.stats.generation_requests == 1


def test_queued_client_that_leaves_frees_its_place(fake_workers, gateway):
    (w,) = fake_workers(1, response_delay=1.0)
    g = gateway(["--worker-urls", w.url, "--max-concurrent-requests", "1", "--queue-size", "1"], wait_workers=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(g.post, "/generate", {"text": "a"}, None, 30)
        wait_for(lambda: w.stats.in_flight == 1, message="first in flight")
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(post_raw("/generate", b'{"text": "queued then gone"}'))
        wait_for(lambda: "smg_admission_queue_depth 1.0" in g.metrics(), message="queued")
        s.close()
        assert first.result().status == 200
        r = g.post("/generate", {"text": "c"}, timeout=30)
        assert r.status == 200
    assert w.stats.generation_requests == 2  # the departed client's request never ran


# --- faults -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reset", "garbage"])
def test_broken_worker_is_retried_on_a_good_one(fake_workers, gateway, mode):
    bad, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", bad.url, good.url, "--retry-initial-backoff-ms", "1"],
                wait_workers=2)
    bad.set(mode=mode)
    for i in range(6):
        r = g.post("/generate", {"text": f"x{i}"}, timeout=10)
        assert r.status == 200 and r.headers["x-smg-routed-worker-id"] == good.url


def test_stalled_worker_times_out_and_retries_elsewhere(fake_workers, gateway):
    stalled, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", stalled.url, good.url, "--request-timeout-secs", "1"],
                wait_workers=2)
    stalled.set(mode="stall")
    statuses = [g.post("/generate", {"text": "x"}, timeout=10).status for _ in range(4)]
    # round robin: every other request went to the stalled worker. The request
    # timeout covers the whole request, so those end with 504 (a stalled
    # worker gives no sign to retry on before then); the others are served
    assert sorted(statuses) == [200, 200, 504, 504]
    assert stalled.stats.requests.get("/generate", 0) == 2
    wait_for(lambda: all(w["load"] == 0 for w in g.workers()), message="loads released")


def test_api_server_flapping_keeps_workers(k8s, pod_workers, gateway):
    port, (w0,) = pod_workers(1)
    k8s.add(make_pod("sglang-worker-0", w0.host, {"app": "sglang-worker"}))
    g = gateway(["--service-discovery", "--selector", "app=sglang-worker", "--service-discovery-namespace",
                 "inference", "--service-discovery-port", str(port)], env=k8s.env)
    wait_for(lambda: [w["status"] for w in g.workers()] == ["ready"], message="ready")
    for _ in range(4):
        k8s.down()
        assert g.post("/generate", {"text": "x"}).status == 200
        time.sleep(0.3)
        k8s.up()
        assert g.post("/generate", {"text": "x"}).status == 200
        k8s.fail(500)
        time.sleep(0.2)
        k8s.fail(None)
    assert [w["url"] for w in g.workers()] == [w0.url]


# --- shutdown -----------------------------------------------------------------

def test_sigterm_finishes_streams_then_exits_0(fake_workers):
    (w,) = fake_workers(1, stream_chunks=10, stream_interval=0.2)
    with GatewayProcess(["--worker-urls", w.url, "--shutdown-grace-period-secs", "30"]) as g:
        g.wait_live()
        g.wait_ready_workers(1)
        idle = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        body = json.dumps({"text": "x", "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        # a stream, and a readiness check pipelined behind it
        s.sendall(post_raw("/generate", body) + b"GET /readiness HTTP/1.1\r\nHost: g\r\n\r\n")
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", g.port), timeout=1).close()
                return False
            except OSError:
                return True

        wait_for(refused, timeout=5, message="no new connections")
        assert idle.recv(4096) == b""  # idle keep-alive connections are closed at once
        data += read_until_close(s)
        assert data.count(b"data: ") == 11  # the stream finished
        tail = data[data.index(b"0\r\n\r\n") + 5:]
        assert tail.startswith(b"HTTP/1.1 503") and b"connection: close" in tail.lower()
        assert g.proc.wait(10) == 0
        assert time.monotonic() - t0 < 10


def test_sigterm_grace_period_bounds_the_wait(fake_workers):
    (w,) = fake_workers(1, stream_chunks=1000, stream_interval=0.1)
    with GatewayProcess(["--worker-urls", w.url, "--shutdown-grace-period-secs", "1"]) as g:
        g.wait_live()
        g.wait_ready_workers(1)
        s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        s.sendall(post_raw("/generate", b'{"text": "x", "stream": true}'))
        s.recv(65536)
        t0 = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        assert g.proc.wait(10) == 0
        assert time.monotonic() - t0 < 4
        s.close()


def test_metrics_listener_binds_where_it_is_told(gateway):
    g = gateway([])  # --prometheus-host 127.0.0.1
    assert g.get("/health").status == 200
    assert request(g.metrics_port, "GET", "/metrics", host="127.0.0.1").status == 200
    # another local address of the machine: nothing listens there
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", g.metrics_port), timeout=2).close()
    # and the gateway port does not serve metrics
    assert g.get("/metrics").status == 404
