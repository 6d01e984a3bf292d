"""The data plane under hostile input and faulty workers: memory and file
descriptors stay bounded, every request gets exactly one answer, every send
to a worker counts against the retry budget, streams that break end in a
way clients understand."""

import concurrent.futures
import os
import re
import socket
import threading
import time

from helpers import GatewayProcess, post_raw, read_until_close, request, wait_for

BIG = 400_000_000


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def head_only(path: str, extra: bytes = b"", length: int = BIG, method: bytes = b"POST") -> bytes:
    return (b"%s %s HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
            % (method, path.encode(), length, extra))


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data` on a new connection; what comes back before the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        return read_until_close(s)
    finally:
        s.close()


def test_requests_refused_on_their_headers_read_no_body(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--api-key", "sekret", "--worker-urls", w.url])
    expect = b"Expect: 100-continue\r\n"
    cases = [
        (head_only("/generate", expect), b"401", b"invalid_api_key"),
        (head_only("/no/such/route", expect + b"Authorization: Bearer sekret\r\n"), b"404", b"unknown_url"),
        (head_only("/workers", expect + b"Authorization: Bearer sekret\r\n", method=b"PUT"), b"405",
         b"method_not_allowed"),
    ]
    for data, status, code in cases:
        out = exchange(g.port, data, timeout=5.0)  # returns: the gateway answered without waiting for 400 MB
        assert out.startswith(b"HTTP/1.1 " + status), out[:200]
        assert b"100 Continue" not in out and out.count(b"HTTP/1.1 ") == 1
        assert code in out and b"connection: close" in out
    assert w.stats.generation_requests == 0
    # a refused client that sends its body anyway costs no memory
    base = rss_kb(g.proc.pid)
    chunk = b"x" * (1 << 20)

    def flood():
        s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
        try:
            s.sendall(head_only("/generate", length=60 << 20))
            got = b""
            for _ in range(60):
                try:
                    s.sendall(chunk)
                except OSError:
                    break  # the gateway closed: fine
            s.settimeout(5)
            try:
                got = read_until_close(s)
            except OSError:
                pass
            return got
        finally:
            s.close()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: flood(), range(4)))
    assert all(a.startswith(b"HTTP/1.1 401") for a in answers), [a[:40] for a in answers]
    assert rss_kb(g.proc.pid) - base < 64 * 1024


def test_pipelined_bodies_behind_a_pending_response_are_bounded(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=20, stream_interval=0.1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    base = rss_kb(g.proc.pid)
    body = b'{"text": "' + b"y" * (16 << 20) + b'"}'
    s = socket.create_connection(("127.0.0.1", g.port), timeout=30)
    sent = {"bytes": 0}

    def send():
        try:
            s.sendall(post_raw("/generate", b'{"text": "slow", "stream": true}'))
            for _ in range(6):
                data = post_raw("/generate", body)
                s.sendall(data)
                sent["bytes"] += len(data)
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    # while the stream is pending, the gateway stops reading at 128 KB:
    # the client's sends block, the gateway's memory stays flat
    wait_for(lambda: w.stats.generation_requests >= 1, message="the stream started")
    peak = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        peak = max(peak, rss_kb(g.proc.pid) - base)
        time.sleep(0.05)
    assert sent["bytes"] < 3 * len(body), "the gateway kept reading behind a pending response"
    assert peak < 64 * 1024
    # and everything is answered in the end
    s.settimeout(30)
    got = b""
    while got.count(b"HTTP/1.1 200") < 7:
        chunk = s.recv(1 << 20)
        assert chunk, got[-300:]
        got += chunk
    t.join(10)
    s.close()


def test_a_retried_response_that_never_ends_leaks_no_connection(fake_workers, gateway):
    stuck, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-urls", stuck.url, good.url], wait_workers=2)
    stuck.set(fail_status=503, fail_endless=True)
    base = open_fds(g.proc.pid)
    for i in range(40):
        assert g.post("/generate", {"text": f"q{i}"}).status == 200
    assert stuck.stats.generation_requests >= 10
    # the stuck worker's connections were closed, not kept reading forever
    wait_for(lambda: open_fds(g.proc.pid) <= base + 4, message="file descriptors back to their baseline")


def test_a_protocol_switch_gets_one_answer(gateway):
    g = gateway([])
    for data in (b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                 b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                 b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
        try:
            s.sendall(data)
            out = read_until_close(s)
        finally:
            s.close()
        assert out.count(b"HTTP/1.1 ") == 1, out


def test_every_send_counts_against_the_retry_budget(fake_workers, gateway):
    workers = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--retry-max-retries", "3", "--retry-initial-backoff-ms", "1",
                 "--worker-urls", *[w.url for w in workers]], wait_workers=2)
    # warm pooled keep-alive connections, then every send is reset by the worker
    for i in range(4):
        assert g.post("/generate", {"text": f"warm {i}"}).status == 200
    for w in workers:
        w.reset_stats()
        w.set(mode="reset")
    r = g.post("/generate", {"text": "doomed"})
    assert r.status >= 500
    received = sum(w.stats.requests.get("/generate", 0) for w in workers)
    assert received == 3, received


def test_black_holed_worker_times_out_and_the_request_goes_elsewhere(fake_workers, gateway):
    hole_port_owner, good = fake_workers(2)
    g = gateway(["--policy", "round_robin", "--worker-connect-timeout-secs", "0.3",
                 "--worker-urls", hole_port_owner.url, good.url], wait_workers=2)
    port = hole_port_owner.port
    hole_port_owner.stop()
    # a listener that never accepts, its queue full: connects to it hang
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", port))
    hole.listen(0)
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        started = time.monotonic()
        statuses = [g.post("/generate", {"text": f"q{i}"}, timeout=20).status for i in range(4)]
        assert statuses == [200] * 4
        assert time.monotonic() - started < 10
        assert re.search(r'smg_worker_connect_timeouts_total\{worker="%s"\} [1-9]' % re.escape(f"http://127.0.0.1:{port}"),
                         g.metrics())
    finally:
        for f in fillers:
            f.close()
        hole.close()


def test_connections_per_worker_are_capped(fake_workers, gateway):
    (w,) = fake_workers(1, response_delay=0.3)
    g = gateway(["--max-connections-per-worker", "2", "--worker-urls", w.url], wait_workers=1)
    w.reset_stats()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: g.post("/generate", {"text": f"q{i}"}, timeout=20).status, range(6)))
    assert statuses == [200] * 6
    assert w.stats.max_in_flight == 2
    assert "smg_worker_upstream_connection_waiting" in g.metrics()


def test_client_request_ids_are_bounded(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    long_id = "r" * 60000
    r = g.post("/generate", {"text": "hi"}, headers={"x-request-id": long_id})
    assert r.status == 200
    assert len(r.headers["x-request-id"]) < 100 and r.headers["x-request-id"] != long_id
    assert w.stats.last_headers["x-request-id"] == r.headers["x-request-id"]
    r = g.post("/generate", {"text": "hi"}, headers={"x-request-id": "fine-id-1"})
    assert r.headers["x-request-id"] == "fine-id-1"


def test_admin_rejects_absurd_worker_urls(gateway):
    g = gateway([])
    for url in ("http://" + "a" * 10000 + ":8000", "http://bad host:8000", "http://exa mple.com",
                "http://[::zz]:8000"):
        r = g.post("/workers", {"url": url})
        assert r.status == 400, (url[:40], r)
    assert g.workers() == []


def test_a_broken_stream_ends_with_an_error_event(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=6, drop_after_chunks=2)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    chat = b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
    out = exchange(g.port, post_raw("/v1/chat/completions", chat))
    assert out.startswith(b"HTTP/1.1 200")
    events = re.findall(rb"data: (.*?)\n\n", out)
    assert len(events) == 4, events  # two from the worker, the error, [DONE]
    assert b'"error"' in events[2] and b'"upstream_error"' in events[2]
    assert events[3] == b"[DONE]"
    assert out.endswith(b"0\r\n\r\n")


def test_a_stream_past_the_request_timeout_ends_with_an_error_event(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=10, stream_interval=1.0)
    g = gateway(["--request-timeout-secs", "1.5", "--worker-urls", w.url], wait_workers=1)
    out = exchange(g.port, post_raw("/generate", b'{"text": "slow", "stream": true}'))
    events = re.findall(rb"data: (.*?)\n\n", out)
    assert events[-1] == b"[DONE]" and b'"request_timeout"' in events[-2], events
    assert out.endswith(b"0\r\n\r\n")


def test_running_out_of_file_descriptors_sheds_idle_connections(fake_workers):
    (w,) = fake_workers(1)
    with GatewayProcess(["--worker-urls", w.url], prefix=["prlimit", "--nofile=200:200"]) as g:
        g.wait_live()
        g.wait_ready_workers(1)
        limit = (200 - 64) // 2
        idle = []
        try:
            for _ in range(limit + 20):
                s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
                idle.append(s)
            # still serving: the longest-idle connections made room
            assert all(request(g.port, "GET", "/health").status == 200 for _ in range(10))
            assert g.post("/generate", {"text": "still here"}).status == 200
            closed = 0
            for s in idle:
                s.settimeout(0.5)
                try:
                    closed += s.recv(1) == b""
                except socket.timeout:
                    pass
            assert closed >= 20
            assert "longest-idle keep-alive connections" in g.logs()
            assert re.search(r"smg_http_connections_shed_total [1-9]", g.metrics())
        finally:
            for s in idle:
                s.close()


def test_a_broken_stream_to_an_http10_client_just_ends(fake_workers, gateway):
    """An HTTP/1.0 client gets the stream unframed: no chunk can be added to
    it, so it ends with the connection."""
    (w,) = fake_workers(1, stream_chunks=6, drop_after_chunks=2)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    out = exchange(g.port, post_raw("/generate", b'{"text": "hi", "stream": true}', version="1.0"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
    assert body.count(b"data: ") == 2 and b"[DONE]" not in body and not body.endswith(b"0\r\n\r\n")
