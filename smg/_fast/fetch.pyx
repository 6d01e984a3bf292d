# cython: language_level=3
"""The control plane's small HTTP client: one request to a worker, its whole
answer as a FetchResult (registration probes, health checks, the fan-out and
informational routes). It runs over the worker's control pool, never the
data plane's, so probes and proxied requests do not share connections."""

import asyncio

from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport Exchange
from smg._fast.upstream cimport UpstreamPool, UpstreamConnection


class FetchResult:
    __slots__ = ("status", "headers", "body", "content_type")

    def __init__(self, int status, bytes headers, bytes body, bytes content_type=None):
        self.status = status
        self.headers = headers
        self.body = body
        self.content_type = content_type

    def __repr__(self):
        return f"<FetchResult {self.status} {len(self.body)} bytes>"


cdef class FetchExchange(Exchange):
    cdef object future
    cdef bytes request
    cdef bint head_only
    cdef list parts
    cdef int status
    cdef bytes headers
    cdef bytes content_type
    cdef object timer
    cdef UpstreamConnection conn
    cdef UpstreamPool pool

    def __init__(self, UpstreamPool pool, bytes request, bint head_only, future):
        self.pool = pool
        self.request = request
        self.head_only = head_only
        self.future = future
        self.parts = []
        self.status = 0
        self.headers = b""
        self.timer = None
        self.conn = None

    cdef int upstream_ready(self, object c) except -1:
        cdef UpstreamConnection conn = <UpstreamConnection>c
        if self.future.done():
            self.pool.release(conn)
            return 0
        self.conn = conn
        conn.attach(self, self.head_only)
        conn.send(self.request)
        return 0

    cdef bint wants_decoded(self):
        return True

    cdef int upstream_response(self, object conn, ResponseParser parser, bytes data,
                               Py_ssize_t off, Py_ssize_t n) except -1:
        self.status = parser.status
        self.headers = parser.forward_headers
        self.content_type = parser.content_type
        return 0

    cdef int upstream_body(self, object conn, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        self.parts.append(data[off:off + n])
        return 0

    cdef int upstream_done(self, object conn) except -1:
        self.conn = None
        if self.timer is not None:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_result(FetchResult(self.status, self.headers, b"".join(self.parts),
                                               self.content_type))
        return 0

    cdef int upstream_failed(self, object c, object exc, int stage) except -1:
        self.conn = None
        if self.timer is not None:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_exception(exc if isinstance(exc, BaseException) else ConnectionError(str(exc)))
        return 0

    def on_timeout(self):
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if not self.future.done():
            self.future.set_exception(asyncio.TimeoutError("worker did not answer in time"))


def fetch(UpstreamPool pool, str method, str path, bytes body=None, headers=None, double timeout=5.0):
    """Send one request to the pool's worker; returns a future of FetchResult.
    `headers` is a list of (name, value) strings; raises asyncio.TimeoutError
    after `timeout` seconds and OSError subclasses on transport failures."""
    loop = pool.loop
    future = loop.create_future()
    lines = [f"{method} {path} HTTP/1.1\r\n", f"host: {pool.host}:{pool.port}\r\n"]
    if headers:
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
    if body is not None:
        lines.append(f"content-length: {len(body)}\r\n")
        if not headers or not any(n.lower() == "content-type" for n, _ in headers):
            lines.append("content-type: application/json\r\n")
    lines.append("\r\n")
    request = "".join(lines).encode("latin-1")
    if body:
        request += body
    cdef FetchExchange ex = FetchExchange(pool, request, method == "HEAD", future)
    ex.timer = loop.call_later(timeout, ex.on_timeout)
    pool.acquire(ex)
    return future
