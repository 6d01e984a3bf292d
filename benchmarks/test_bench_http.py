"""Request and response framing on the data plane, without sockets.

    .venv/bin/python -m pytest benchmarks/ --benchmark-only
"""

import asyncio

import orjson
import pytest

from smg._fast.http1 import ResponseParser
from smg._fast.routes import Response, Route
from smg._fast.server import ServerCore

JSON_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 211\r\n"
                 b"date: Thu, 26 Nov 2026 18:00:00 GMT\r\nserver: uvicorn\r\n\r\n" + b"x" * 211)
SSE_EVENT = b'data: {"text":"tok ","meta_info":{"id":"1","finish_reason":null}}\n\n'
SSE_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(SSE_EVENT), SSE_EVENT) for _ in range(16)) + b"0\r\n\r\n")


def test_parse_json_response(benchmark):
    p = ResponseParser()

    def parse():
        p.reset()
        return p.feed(JSON_RESPONSE)

    assert benchmark(parse)[1] == 211


def test_parse_streamed_response_passthrough(benchmark):
    """16 SSE chunks walked for framing only (the proxy relays the bytes as they are)."""
    p = ResponseParser()

    def parse():
        p.reset()
        p.feed(SSE_RESPONSE)
        return p.done()

    assert benchmark(parse)


def test_parse_streamed_response_decoded(benchmark):
    p = ResponseParser()

    def parse():
        p.reset()
        return p.feed(SSE_RESPONSE, True)[2]

    assert len(benchmark(parse)) == 16


class NullTransport:
    def write(self, data):
        pass

    def close(self):
        pass

    def abort(self):
        pass

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return default


@pytest.mark.parametrize("body_size", [100, 1024, 16384])
def test_request_parse_and_answer(benchmark, body_size):
    """One keep-alive request through httptools, header slots, dispatch and
    a response write: the server's cost per request, minus the proxy."""
    loop = asyncio.new_event_loop()
    core = ServerCore(loop)
    ok = Response(200, b"{}", b"application/json")
    core.add_route(Route("/generate", ["POST"], handler=lambda req: ok, auth="serving"))
    conn = core.protocol_factory()
    conn.connection_made(NullTransport())
    body = orjson.dumps({"text": "x" * body_size})
    raw = (b"POST /generate HTTP/1.1\r\nHost: gw\r\nUser-Agent: bench\r\nAccept: */*\r\n"
           b"Content-Type: application/json\r\nX-Request-Id: abc\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    benchmark(conn.data_received, raw)
    loop.close()
