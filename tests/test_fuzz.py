"""Fuzzing the request path with hypothesis, in-process and bounded in time:
the client-side parser and dispatch, the upstream response parser, body
validation and routing text, and PD bootstrap splicing."""

import asyncio
import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smg._fast.http1 import ResponseParser, UpstreamProtocolError
from smg._fast.pd import PDHandler, add_bootstrap, batch_size
from smg._fast.policies import RoundRobinPolicy, Router
from smg._fast.call import CallSettings
from smg._fast.proxy import ProxyHandler
from smg._fast.routing_text import ENDPOINTS, invalid_field, routing_text
from smg._fast.routes import Response, Route
from smg._fast.server import ServerCore
from smg._fast.upstream import UpstreamPool
from smg._fast.worker import DECODE, PREFILL, READY, REGULAR, Worker

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        self.out += data

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default


def make_core(pd=False):
    """A server core with the proxied routes and ready workers, whose pools
    refuse to connect: a valid request gets as far as a ProxyCall (or a PD
    call), which fails it with a 502 (no retries)."""
    loop = asyncio.new_event_loop()
    core = ServerCore(loop, max_payload=4096, max_header_bytes=2048, max_headers=20)
    router = Router(lambda t: RoundRobinPolicy())
    for i, wtype in enumerate((PREFILL, DECODE) if pd else (REGULAR,)):
        w = Worker(f"w{i}", f"http://127.0.0.1:{9000 + i}", "fake-model", wtype)
        w.pool = UpstreamPool(w.host, w.port, 3.0, loop)
        w.pool.close()
        w.state = READY
        router.add_worker(w)
    proxy = CallSettings(router, loop, max_attempts=1)
    cls = PDHandler if pd else ProxyHandler
    for path, ep in ENDPOINTS.items():
        core.add_route(Route(path, ["POST"], native=cls(proxy, ep), auth="serving"))
    core.add_route(Route("/health", ["GET"], handler=lambda req: Response(200, b"OK", b"text/plain")))
    return core, loop


REQUEST_LINES = st.sampled_from([
    b"GET /health HTTP/1.1\r\n", b"POST /generate HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\n",
    b"GET /nope HTTP/1.0\r\n", b"DELETE /generate HTTP/1.1\r\n", b"POST /rerank HTTP/1.1\r\n",
])
HEADERS = st.lists(st.sampled_from([
    b"Host: g\r\n", b"Content-Type: application/json\r\n", b"Connection: close\r\n",
    b"Expect: 100-continue\r\n", b"Authorization: Bearer k\r\n", b"X-Request-Id: abc\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"X-Junk: \x01\r\n",
]), max_size=5)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
BODY_DICTS = st.dictionaries(
    st.sampled_from(["text", "messages", "prompt", "input", "query", "input_ids", "stream", "model", "documents",
                     "bootstrap_room", "x"]),
    JSON_VALUES, max_size=6)


def request_bytes(line, headers, body):
    return line + b"".join(headers) + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("pd", [False, True])
def test_the_dispatch_fuzzer_reaches_the_proxy(pd):
    core, loop = make_core(pd)
    try:
        conn = core.protocol_factory()
        t = FakeTransport()
        conn.connection_made(t)
        conn.data_received(request_bytes(b"POST /generate HTTP/1.1\r\n", [], b'{"text": "hi"}'))
        expected = b"HTTP/1.1 502" if pd else b"HTTP/1.1 500"
        code = b"worker_unreachable" if pd else b"call_upstream_connection_failed"
        assert bytes(t.out).startswith(expected) and code in t.out
    finally:
        loop.close()


@FUZZ
@given(st.lists(st.tuples(REQUEST_LINES, HEADERS, st.one_of(BODY_DICTS.map(orjson.dumps), st.binary(max_size=64))),
                min_size=1, max_size=4),
       st.lists(st.integers(1, 64), min_size=1, max_size=8), st.booleans())
def test_client_parser_and_dispatch_never_break(requests, splits, pd):
    core, loop = make_core(pd)
    try:
        conn = core.protocol_factory()
        t = FakeTransport()
        conn.connection_made(t)
        data = b"".join(request_bytes(*r) for r in requests)
        pos = 0
        i = 0
        while pos < len(data) and not t.closed:
            n = splits[i % len(splits)]
            conn.data_received(data[pos:pos + n])
            pos += n
            i += 1
        conn.connection_lost(None)
        out = bytes(t.out)
        # every answer is a well-formed HTTP/1.1 response
        for part in out.split(b"HTTP/1.1 ")[1:]:
            assert part[:3].isdigit()
        assert out.count(b"HTTP/1.1 ") - out.count(b"HTTP/1.1 100 Continue") <= len(requests)
    finally:
        loop.close()


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 50), min_size=1, max_size=6), st.booleans())
def test_response_parser_on_garbage(data, splits, decode):
    p = ResponseParser()
    pos = 0
    i = 0
    try:
        while pos < len(data):
            n = splits[i % len(splits)]
            p.feed(data[pos:pos + n], decode)
            pos += n
            i += 1
            if p.done():
                break
    except UpstreamProtocolError:
        pass


HEADER_NAMES = st.sampled_from(["Content-Type", "X-A", "Server", "Date", "Keep-Alive", "Connection", "Trailer"])
HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)


@FUZZ
@given(st.integers(100, 599).filter(lambda s: s != 101),  # 101 switches protocols: final, never from a worker
       st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
       st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.booleans(),
       st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_response_parser_on_valid_responses(status, headers, chunks, chunked, splits):
    no_body = 100 <= status < 200 or status in (204, 304)
    if no_body:
        chunks = []
    payload = b"".join(chunks)
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\nX-Trailer: t\r\n\r\n"
    else:
        head += b"Content-Length: %d\r\n\r\n" % len(payload)
        body = payload
    if no_body:
        body = b""  # whatever the head says, these statuses have no body
    data = head + body
    if 100 <= status < 200:
        data = data + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"  # an interim response, then the real one
    p = ResponseParser()
    pos = 0
    consumed = 0
    decoded = []
    i = 0
    while pos < len(data) and not p.done():
        piece = data[pos:pos + splits[i % len(splits)]]
        head_done, used, parts = p.feed(piece, True)
        consumed += used
        decoded.extend(parts or [])
        pos += len(piece)
        i += 1
    assert p.done()
    if 100 <= status < 200:
        assert p.status == 200
        return
    assert p.status == status
    assert b"".join(decoded) == payload
    assert p.chunked == (chunked and not no_body)
    for k, v in headers:
        if k.lower() not in ("keep-alive", "connection", "trailer"):
            assert f"{k}: {v}".encode() in p.forward_headers


@FUZZ
@given(BODY_DICTS, st.sampled_from(list(ENDPOINTS.values())))
def test_validation_and_routing_text_never_raise(body, endpoint):
    why = invalid_field(endpoint, body)
    assert why is None or (why[0] in ("missing_required_parameter", "invalid_type", "invalid_value")
                           and isinstance(why[1], str)
                           and isinstance(why[2], str))
    assert isinstance(routing_text(endpoint, body), str)


@FUZZ
@given(BODY_DICTS, st.text(min_size=1, max_size=20), st.one_of(st.none(), st.integers(1, 65535)),
       st.sampled_from(["", " ", "\n  "]), st.sampled_from(list(ENDPOINTS.values())))
def test_bootstrap_splicing(obj, host, port, trailing, endpoint):
    body = orjson.dumps(obj) + trailing.encode()
    batch = batch_size(endpoint, obj)
    out = json.loads(add_bootstrap(body, obj, host, port, batch))
    for k, v in obj.items():
        if not k.startswith("bootstrap_"):
            assert out[k] == json.loads(orjson.dumps(v))
    if batch < 0:
        assert out["bootstrap_host"] == host and out["bootstrap_port"] == port
        assert 0 <= out["bootstrap_room"] < 2 ** 63
    else:
        assert out["bootstrap_host"] == [host] * batch and out["bootstrap_port"] == [port] * batch
        assert len(out["bootstrap_room"]) == batch


@pytest.mark.parametrize("pd", [False, True])
def test_a_finished_call_is_freed_without_the_garbage_collector(pd):
    """A call and its legs reference each other while the call runs; when it
    ends, the references are dropped, so reference counting frees them and
    nothing waits for a cyclic garbage collection (which would hold the
    memory of every call made since the last one)."""
    import gc

    core, loop = make_core(pd)
    gc.collect()
    gc.disable()
    try:
        conn = core.protocol_factory()
        t = FakeTransport()
        conn.connection_made(t)
        for _ in range(20):
            conn.data_received(request_bytes(b"POST /generate HTTP/1.1\r\n", [], b'{"text": "hi"}'))
        assert bytes(t.out).count(b"HTTP/1.1 5") == 20  # 502s, then 503s once the breaker opens
        alive = [o for o in gc.get_objects() if type(o).__name__ in ("ProxyCall", "PDCall", "Leg", "RequestCycle")]
        assert alive == []
    finally:
        gc.enable()
        loop.close()
