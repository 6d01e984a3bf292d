"""Streamed request bodies (--max-buffered-request-bytes,
--stream-body-stall-timeout-secs): a body larger than the buffer limit
goes to the worker as it arrives when the gateway need not read it."""

import json
import socket
import time

from helpers import read_until_close, wait_for

BIG = json.dumps({"text": "x" * 200_000}).encode()
ROUND_ROBIN = ["--policy", "round_robin", "--max-buffered-request-bytes", "4096"]


def head(length: int = None, chunked: bool = False, path: str = "/generate") -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % length
    return b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n%s\r\n" % (path.encode(), framing)


def response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    headers, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in headers.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return headers + b"\r\n\r\n" + rest


def test_a_large_body_reaches_the_worker_before_the_client_has_sent_it_all(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, *ROUND_ROBIN], wait_workers=1)
    s = socket.create_connection(("127.0.0.1", g.port))
    try:
        s.sendall(head(len(BIG)) + BIG[:50_000])
        # the worker has the request's head and the first bytes while the rest is unsent
        wait_for(lambda: w.stats.body_bytes >= 50_000, message="the body's start at the worker")
        assert w.stats.requests.get("/generate", 0) == 0
        s.sendall(BIG[50_000:])
        r = response(s)
        assert r.startswith(b"HTTP/1.1 200"), r[:200]
        assert w.stats.last_body == BIG
        # the connection stays usable: a small request after it is buffered and validated
        s.sendall(head(9) + b"{not json")
        assert response(s).startswith(b"HTTP/1.1 400")
    finally:
        s.close()


def test_a_chunked_body_streams_once_it_outgrows_the_buffer(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, *ROUND_ROBIN], wait_workers=1)
    s = socket.create_connection(("127.0.0.1", g.port))
    try:
        s.sendall(head(chunked=True))
        sent = 0
        for i in range(0, 60_000, 3000):
            part = BIG[i:i + 3000]
            s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            sent = i + 3000
        wait_for(lambda: w.stats.body_bytes >= 50_000, message="the streamed start at the worker")
        rest = BIG[sent:]
        s.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
        r = response(s)
        assert r.startswith(b"HTTP/1.1 200"), r[:200]
        assert w.stats.last_body == BIG
    finally:
        s.close()


def test_bodies_the_gateway_must_read_are_buffered(fake_workers, gateway):
    """cache_aware routes by the prompt: the whole body is read and checked first."""
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, "--policy", "cache_aware", "--max-buffered-request-bytes", "4096"],
                wait_workers=1)
    s = socket.create_connection(("127.0.0.1", g.port))
    try:
        s.sendall(head(len(BIG)) + BIG[:50_000])
        time.sleep(0.3)  # a negative check: the worker must not see anything; no event to wait for
        assert w.stats.body_bytes == 0
        s.sendall(BIG[50_000:])
        assert response(s).startswith(b"HTTP/1.1 200")
        bad = b'{"text": 5, "pad": "' + b"x" * 10_000 + b'"}'
        s.sendall(head(len(bad)) + bad)
        assert response(s).startswith(b"HTTP/1.1 400")  # validated by the gateway
    finally:
        s.close()


def test_a_stalled_streamed_body_is_given_up_with_408(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, *ROUND_ROBIN, "--stream-body-stall-timeout-secs", "0.5"], wait_workers=1)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        s.sendall(head(len(BIG)) + BIG[:20_000])
        started = time.monotonic()
        r = read_until_close(s)
        assert r.startswith(b"HTTP/1.1 408") and b"stream-body-stall-timeout-secs" in r
        assert time.monotonic() - started < 5
    finally:
        s.close()
    # the worker's connection was closed under the unfinished request
    assert w.stats.body_bytes >= 20_000
    wait_for(lambda: not any(c.req.body for c in list(w._conns)), message="the worker's connection closed")
    assert w.stats.requests.get("/generate", 0) == 0


def test_a_chunked_streamed_body_over_the_payload_limit_is_refused(fake_workers, gateway):
    (w,) = fake_workers(1)
    g = gateway(["--worker-urls", w.url, *ROUND_ROBIN, "--max-payload-size", "30000"], wait_workers=1)
    s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
    try:
        s.sendall(head(chunked=True))
        for i in range(0, 60_000, 3000):
            try:
                s.sendall(b"%x\r\n%s\r\n" % (3000, BIG[i:i + 3000]))
            except OSError:
                break
        r = read_until_close(s)
        assert r.startswith(b"HTTP/1.1 413"), r[:200]
    finally:
        s.close()
    assert w.stats.requests.get("/generate", 0) == 0
