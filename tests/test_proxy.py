"""Forwarding: streaming, disconnects, upstream failures, keep-alive, auth."""

import json
import re
import socket
import time

import pytest
from helpers import post_raw, raw_exchange, read_until_close, wait_for


class StreamReader:
    """Reads an HTTP/1.1 chunked response from a socket, one chunk at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def head(self) -> tuple[int, dict]:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before head")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return int(lines[0].split()[1]), headers

    def chunk(self) -> bytes:
        """The next chunk's payload; b"" at the terminating chunk."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed mid-stream")
        size_line, rest = self.buf.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            if not self._fill():
                raise ConnectionError("closed mid-chunk")
            size_line, rest = self.buf.split(b"\r\n", 1)
        payload, self.buf = rest[:size], rest[size + 2:]
        return payload


def _open_stream(port: int, path: str, body: dict, timeout: float = 10.0) -> tuple[socket.socket, StreamReader]:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(post_raw(path, json.dumps(body).encode()))
    return s, StreamReader(s)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
    ("/generate", {"text": "hi", "stream": True}),
    ("/v1/completions", {"prompt": "hi", "stream": True}),
])
def test_stream_arrives_incrementally(fake_workers, gateway, path, body):
    (w,) = fake_workers(1, stream_chunks=5, stream_interval=0.3)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    s, rd = _open_stream(g.port, path, body)
    with s:
        status, headers = rd.head()
        assert status == 200
        assert headers["content-type"] == "text/event-stream"
        assert headers["transfer-encoding"] == "chunked"
        first = rd.chunk()
        assert first.startswith(b"data: ")
        # the worker is still streaming: the first event was relayed, not buffered
        assert w.stats.in_flight == 1 and w.stats.completed == 0
        events = [first]
        while True:
            c = rd.chunk()
            if not c:
                break
            events.append(c)
        payload = b"".join(events)
        assert payload.count(b"data: ") == 6  # 5 events + [DONE]
        assert payload.endswith(b"data: [DONE]\n\n")
    wait_for(lambda: w.stats.completed == 1, message="worker finished")


def test_client_disconnect_mid_stream_ends_upstream_request(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=1000, stream_interval=0.05)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    s, rd = _open_stream(g.port, "/generate", {"text": "hi", "stream": True})
    rd.head()
    rd.chunk()
    assert w.stats.in_flight == 1
    s.close()
    wait_for(lambda: w.stats.disconnects == 1 and w.stats.in_flight == 0, message="upstream request cancelled")
    assert w.stats.completed == 0
    # the gateway's in-flight count is released too
    wait_for(lambda: g.workers()[0]["load"] == 0, message="load released")
    assert 'smg_http_responses_total{error_code="client_closed_request",path="/generate",status_code="499"} 1.0' \
        in g.metrics()


def test_upstream_refused_is_500_connection_failed(fake_workers, gateway):
    """As on the reference: 500 call_upstream_connection_failed."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--retry-max-retries", "2", "--retry-initial-backoff-ms", "1",
                 "--disable-health-check"], wait_workers=1)
    w.stop()
    r = g.post("/generate", {"text": "hi"})
    assert r.status == 500
    assert r.json()["error"]["code"] == "call_upstream_connection_failed"
    assert r.headers["x-smg-error-code"] == "call_upstream_connection_failed"


def test_upstream_timeout_is_504(fake_workers, gateway):
    (w,) = fake_workers(1, response_delay=30)
    g = gateway(["--worker-urls", w.url, "--request-timeout-secs", "1"], wait_workers=1)
    t0 = time.monotonic()
    r = g.post("/generate", {"text": "hi"}, timeout=20)
    assert r.status == 504
    assert r.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - t0 < 5
    wait_for(lambda: w.stats.disconnects == 1, message="timed-out upstream request cancelled")


def test_upstream_drop_mid_stream_closes_client_cleanly(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=10, drop_after_chunks=2)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    s, rd = _open_stream(g.port, "/generate", {"text": "hi", "stream": True}, timeout=5)
    with s:
        status, _ = rd.head()
        assert status == 200
        assert rd.chunk().startswith(b"data: ")
        assert rd.chunk().startswith(b"data: ")
        # the stream ends as clients understand it: an error event, [DONE],
        # the end of the body; then the connection closes
        last = rd.chunk()
        assert last.startswith(b'data: {"error":') and b'"upstream_error"' in last
        assert last.endswith(b"data: [DONE]\n\n")
        assert rd.chunk() == b""
        assert s.recv(1) == b""
    text = g.metrics()
    assert 'error_code="stream_error",path="/generate",status_code="200"' in text


def test_upstream_garbage_is_a_request_error(fake_workers, gateway):
    (w,) = fake_workers(1, mode="garbage")
    g = gateway(["--worker-urls", w.url, "--disable-retries"], wait_workers=1)
    r = g.post("/generate", {"text": "hi"})
    assert r.status == 500 and r.json()["error"]["code"] == "call_upstream_request_error"


def test_upstream_connections_are_reused(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--disable-health-check"], wait_workers=1)
    g.post("/generate", {"text": "warm"})
    before = w.stats.connections
    for i in range(30):
        assert g.post("/generate", {"text": f"r{i}"}).status == 200
    assert w.stats.connections == before


def test_api_key(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--api-key", "sekret"])
    wait_for(lambda: g.get("/readiness").status == 200, message="ready")
    r = g.post("/generate", {"text": "hi"})
    assert r.status == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = g.post("/generate", {"text": "hi"}, headers={"authorization": "Bearer wrong"})
    assert r.status == 401 and r.json()["error"]["message"] == "Invalid API key"
    r = g.post("/generate", {"text": "hi"}, headers={"authorization": "Bearer sekret"})
    assert r.status == 200
    # the client's key reaches the worker (it has no key of its own)
    assert w.stats.last_headers["authorization"] == "Bearer sekret"
    assert g.get("/health").status == 200 and g.get("/liveness").status == 200
    assert g.get("/workers").status == 401
    assert g.get("/workers", headers={"authorization": "Bearer sekret"}).status == 200
    # the scheme is case-insensitive (RFC 9110), as on the reference; other schemes are not a bearer token
    for scheme, status in (("bearer", 200), ("BEARER", 200), ("Basic", 401), ("Bearersekret", 401)):
        auth = f"{scheme} sekret" if scheme != "Bearersekret" else scheme
        assert g.post("/generate", {"text": "hi"}, headers={"authorization": auth}).status == status, scheme


def test_pipelined_requests_answered_in_order(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    reqs = b"".join(post_raw("/generate", json.dumps({"text": f"p{i}"}).encode(), b"x-request-id: id-%d\r\n" % i)
                    for i in range(5))
    reqs += b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    data = raw_exchange(g.port, reqs)
    ids = [line.split(b": ")[1] for line in data.split(b"\r\n") if line.lower().startswith(b"x-request-id")]
    assert ids[:5] == [f"id-{i}".encode() for i in range(5)]
    assert data.count(b"HTTP/1.1 200 OK") == 6
    assert data.endswith(b"OK")


def test_chunked_request_body_is_forwarded(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    body = b'{"text": "chunked body"}'
    req = (b"POST /generate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
           + b"%x\r\n%s\r\n" % (10, body[:10]) + b"%x\r\n%s\r\n" % (len(body) - 10, body[10:]) + b"0\r\n\r\n")
    data = raw_exchange(g.port, req)
    assert data.startswith(b"HTTP/1.1 200")
    assert w.stats.last_body == body
    assert w.stats.last_headers["content-length"] == str(len(body))


def test_expect_100_continue(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    body = b'{"text": "after continue"}'
    s = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    with s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 200")
    assert w.stats.last_body == body


def test_http10_client_gets_unchunked_stream(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=3)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    data = raw_exchange(g.port, post_raw("/generate", b'{"text":"x","stream":true}', version="1.0"))
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body.count(b"data: ") == 4 and body.endswith(b"data: [DONE]\n\n")


def test_oversized_body_is_413(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--max-payload-size", "1000"], wait_workers=1)
    r = g.post("/generate", {"text": "x" * 2000})
    assert r.status == 413
    assert r.json()["error"]["code"] == "request_body_too_large"
    # chunked, so the size is only known while reading
    big = b'{"text": "' + b"y" * 3000 + b'"}'
    req = (b"POST /generate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 500]), big[i:i + 500]) for i in range(0, len(big), 500))
           + b"0\r\n\r\n")
    data = raw_exchange(g.port, req)
    assert data.startswith(b"HTTP/1.1 413")
    assert w.stats.generation_requests == 0
    assert g.post("/generate", {"text": "small"}).status == 200


def test_oversized_headers_are_431(gateway):
    g = gateway([])
    data = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    data = raw_exchange(g.port, b"GET /health HTTP/1.1\r\nHost: gw\r\n" + many + b"\r\n")
    assert data.startswith(b"HTTP/1.1 431")


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /generate HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
])
def test_malformed_http_is_400_and_closed(gateway, garbage):
    g = gateway([])
    data = raw_exchange(g.port, garbage)
    assert data.startswith(b"HTTP/1.1 400"), data
    assert b"connection: close" in data.lower()
    assert g.get("/health").status == 200  # the gateway is unharmed


def test_header_read_timeout(gateway):
    g = gateway(["--header-read-timeout-secs", "1"])
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    with s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n")  # headers never finish
        t0 = time.monotonic()
        data = read_until_close(s)
        assert data.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - t0 < 5


def test_idle_keepalive_connection_is_closed(gateway):
    g = gateway(["--idle-connection-timeout-secs", "1"])
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    with s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(4096) == b""  # the server closed the idle connection
        assert 0.5 < time.monotonic() - t0 < 5


def test_request_on_a_connection_the_worker_just_closed_is_sent_again(fake_workers, gateway):
    """A worker may close a kept-alive connection just as it is reused (its
    keep-alive timeout): the request never reached it, so the gateway sends
    it again at once on a fresh connection to the same worker, as one more
    attempt (every send counts against --retry-max-retries)."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--retry-max-retries", "2", "--disable-health-check"], wait_workers=1)
    w.set(close_reused=True)
    for i in range(5):
        r = g.post("/generate", {"text": f"x{i}"})
        assert r.status == 200, r
    assert w.stats.generation_requests == 5
    assert w.stats.connections >= 5  # each reused connection was closed on it
    # with a budget of one send, the race is the request's failure
    g2 = gateway(["--worker-urls", w.url, "--disable-retries", "--disable-health-check"], wait_workers=1)
    assert g2.post("/generate", {"text": "opens a connection"}).status == 200
    assert g2.post("/generate", {"text": "reuses it"}).status == 500
    assert g2.post("/generate", {"text": "on a fresh one"}).status == 200


def test_probes_and_proxied_requests_use_separate_connections(fake_workers, gateway):
    """The control plane's probes have their own pool: a proxied request never
    reuses a connection a probe left behind (whose keep-alive state the proxy
    knows nothing of)."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url], wait_workers=1)
    gauge = re.compile(r'smg_worker_upstream_connections\{worker="%s"\} (\S+)' % re.escape(w.url))
    assert float(gauge.search(g.metrics()).group(1)) == 0.0  # registration probes did not touch it
    assert g.post("/generate", {"text": "hi"}).status == 200
    assert float(gauge.search(g.metrics()).group(1)) == 1.0


def test_a_silent_event_stream_gets_keep_alive_comments_between_events(fake_workers, gateway):
    """--sse-keepalive-secs: while the worker is silent, the client gets an
    SSE comment (which clients ignore) instead of nothing, so proxies with
    idle timeouts keep the stream open; only between events."""
    (w,) = fake_workers(1, stream_chunks=3, stream_interval=1.2)
    g = gateway(["--worker-urls", w.url, "--sse-keepalive-secs", "0.3"], wait_workers=1)
    r = g.post("/v1/chat/completions", {"model": "fake-model", "stream": True,
                                        "messages": [{"role": "user", "content": "hi"}]}, timeout=20)
    assert r.status == 200
    events = [e for e in r.body.decode().split("\n\n") if e]
    assert events.count(": keep-alive") >= 2
    data = [e for e in events if e.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and len(data) == 4
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in data[:-1])


def test_no_keep_alive_comments_when_off(fake_workers, gateway):
    (w,) = fake_workers(1, stream_chunks=2, stream_interval=0.8)
    g = gateway(["--worker-urls", w.url, "--sse-keepalive-secs", "0"], wait_workers=1)
    r = g.post("/generate", {"text": "x", "stream": True}, timeout=20)
    assert r.status == 200 and b"keep-alive" not in r.body
