# cython: language_level=3
"""Connections from the gateway to workers: a keep-alive pool per worker
address and the protocol that parses responses. The data plane's proxy and
the control plane's client (smg._fast.fetch) each have their own pools."""

import asyncio
from collections import deque

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from smg._fast.clock cimport monotonic
from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport Exchange, FAIL_CONNECT, FAIL_BEFORE_HEAD, FAIL_BODY

from smg._fast.http1 import UpstreamProtocolError


# A reused keep-alive connection that dies this soon after the request was
# written, with no byte back, was closed by the worker as we reused it (the
# keep-alive race): the request most likely never reached it. Later, the
# worker may have read it and be working on it: that is a real failure.
DEF STALE_WINDOW = 0.25


class UpstreamClosed(ConnectionError):
    """The worker closed the connection before the response ended."""


cdef class UpstreamPool:

    def __init__(self, str host, int port, double idle_timeout=3.0, loop=None, double connect_timeout=0.0,
                 int max_connections=0, ssl_context=None):
        """ssl_context: TLS to the worker (an https:// URL), verified for `host`."""
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.closed = False
        self.open_count = 0
        self.connecting = 0
        self.connect_timeouts_total = 0
        self.idle = []
        self.queue = deque()
        self.loop = loop if loop is not None else asyncio.get_event_loop()

    @property
    def waiting(self):
        """Requests waiting for a connection slot (max_connections)."""
        return sum(1 for w in self.queue if not (<ConnectWaiter>w).cancelled)

    def __repr__(self):
        return f"<UpstreamPool {self.host}:{self.port} open={self.open_count} idle={len(self.idle)}>"

    cdef UpstreamConnection take_idle(self):
        cdef UpstreamConnection conn
        while self.idle:
            conn = <UpstreamConnection>self.idle.pop()
            if not conn.closed:
                return conn
        return None

    cdef ConnectWaiter acquire(self, Exchange ex, bint fresh=False):
        """Give `ex` a connection: an idle one at once (unless `fresh`), else a
        new one when connected (ex.upstream_ready) or the connect error
        (ex.upstream_failed). Returns the waiter of a new connection (to
        cancel it), else None."""
        cdef UpstreamConnection conn = None if fresh else self.take_idle()
        cdef ConnectWaiter waiter
        if conn is not None:
            conn.reused = True
            ex.upstream_ready(conn)
            return None
        if self.closed:
            ex.upstream_failed(None, ConnectionRefusedError("worker removed"), FAIL_CONNECT)
            return None
        waiter = ConnectWaiter(self, ex)
        if self.max_connections > 0 and self.open_count + self.connecting >= self.max_connections:
            # at the cap: wait for a connection to come back or close
            self.queue.append(waiter)
            return waiter
        self.connect(waiter)
        return waiter

    cdef int connect(self, ConnectWaiter waiter) except -1:
        self.connecting += 1
        task = self.loop.create_task(self.loop.create_connection(
            lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl_context,
            server_hostname=self.host if self.ssl_context is not None else None))
        if self.connect_timeout > 0:
            waiter.timer = self.loop.call_later(self.connect_timeout, waiter.time_out, task)
        task.add_done_callback(waiter)
        return 0

    cdef int admit_queued(self) except -1:
        """A connection slot freed up: the next live waiter connects."""
        cdef ConnectWaiter waiter
        while self.queue and (self.max_connections <= 0
                              or self.open_count + self.connecting < self.max_connections):
            waiter = <ConnectWaiter>self.queue.popleft()
            if waiter.cancelled:
                continue
            if self.closed:
                waiter.ex.upstream_failed(None, ConnectionRefusedError("worker removed"), FAIL_CONNECT)
                continue
            self.connect(waiter)
        return 0

    cdef int release(self, UpstreamConnection conn) except -1:
        cdef ConnectWaiter waiter
        if conn.closed:
            return 0
        if self.closed or self.idle_timeout <= 0:
            conn.abort()
            return 0
        while self.queue:
            # a request waiting for a connection slot takes this one
            waiter = <ConnectWaiter>self.queue.popleft()
            if waiter.cancelled:
                continue
            conn.reused = True
            waiter.ex.upstream_ready(conn)
            return 0
        conn.idle_since = monotonic()
        conn.reused = False
        self.idle.append(conn)
        return 0

    cdef int forget(self, UpstreamConnection conn) except -1:
        self.open_count -= 1
        if self.queue:
            self.admit_queued()
        return 0

    def sweep(self, double now=0.0):
        """Close connections idle for longer than idle_timeout."""
        cdef UpstreamConnection conn
        cdef list keep = []
        if now == 0.0:
            now = monotonic()
        for conn in self.idle:
            if conn.closed:
                continue
            if now - conn.idle_since > self.idle_timeout:
                conn.abort()
            else:
                keep.append(conn)
        self.idle = keep

    def close(self):
        """No new connections; idle ones close now, busy ones when released."""
        cdef UpstreamConnection conn
        self.closed = True
        for conn in self.idle:
            conn.abort()
        self.idle = []
        self.admit_queued()


cdef class ConnectWaiter:

    def __init__(self, UpstreamPool pool, Exchange ex):
        self.pool = pool
        self.ex = ex
        self.cancelled = False
        self.timer = None
        self.timed_out = False

    def time_out(self, task):
        self.timed_out = True
        self.pool.connect_timeouts_total += 1
        task.cancel()

    def __call__(self, task):
        cdef UpstreamConnection conn
        self.pool.connecting -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if task.cancelled() or task.exception() is not None:
            if self.pool.queue:
                self.pool.admit_queued()
            if self.cancelled:
                return
            if self.timed_out:
                exc = TimeoutError(f"no connection within {self.pool.connect_timeout:g} s")
            elif task.cancelled():
                exc = ConnectionError("connect cancelled")
            else:
                exc = task.exception()
            self.ex.upstream_failed(None, exc, FAIL_CONNECT)
            return
        conn = <UpstreamConnection>task.result()[1]
        if self.cancelled:
            # the exchange gave up while we were connecting; keep the connection
            self.pool.release(conn)
            return
        self.ex.upstream_ready(conn)


cdef class UpstreamConnection:

    def __init__(self, UpstreamPool pool):
        self.pool = pool
        self.transport = None
        self.ex = None
        self.parser = ResponseParser()
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.sent_at = 0.0
        self.reading_paused = False
        self.idle_since = 0.0
        self.decoded = None
        self.sending = False

    # asyncio protocol
    def connection_made(self, transport):
        self.transport = transport
        self.pool.open_count += 1

    def data_received(self, bytes data):
        cdef Exchange ex = self.ex
        cdef Py_ssize_t off = 0, used, n
        cdef bint head_done = False
        cdef object piece
        if ex is None:
            # bytes nobody asked for (an idle connection): unusable
            self.abort()
            return
        self.got_bytes = True
        n = PyBytes_GET_SIZE(data)
        try:
            if self.parser.in_head():
                off = self.parser.feed_head(data)
                if off < 0:
                    return
                head_done = True
            if self.decoded is not None:
                used = self.parser.feed_body(<const unsigned char*>PyBytes_AS_STRING(data) + off, n - off, self.decoded)
            else:
                used = self.parser.feed_body(<const unsigned char*>PyBytes_AS_STRING(data) + off, n - off, None)
        except UpstreamProtocolError as e:
            self._fail(e, FAIL_BODY if not head_done and not self.parser.in_head() else FAIL_BEFORE_HEAD)
            return
        if off + used < n:
            # bytes past the end of the response: the worker broke framing
            self.parser.keep_alive = False
        if self.decoded is not None:
            if head_done:
                ex.upstream_response(self, self.parser, b"", 0, 0)
            for piece in self.decoded:
                if self.ex is not ex:
                    return
                ex.upstream_body(self, <bytes>piece, 0, PyBytes_GET_SIZE(piece))
            self.decoded = []
        elif head_done:
            ex.upstream_response(self, self.parser, data, off, used)
        elif used > 0:
            ex.upstream_body(self, data, off, used)
        if self.ex is ex and self.parser.done():
            self._message_done()
            ex.upstream_done(self)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        cdef Exchange ex = self.ex
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        if ex is None:
            return
        if self.parser.until_eof():
            self.parser.finish_eof()
            self.ex = None
            ex.upstream_done(self)
            return
        self.ex = None
        if self.parser.in_head():
            if self.reused and not self.got_bytes and monotonic() - self.sent_at < STALE_WINDOW:
                # the worker had closed this idle keep-alive connection as we
                # reused it: the request most likely never reached it
                ex.upstream_stale(self)
                return
            ex.upstream_failed(self, exc or UpstreamClosed("worker closed the connection before responding"),
                               FAIL_BEFORE_HEAD)
        else:
            ex.upstream_failed(self, exc or UpstreamClosed("worker closed the connection mid-response"), FAIL_BODY)

    def pause_writing(self):
        if self.ex is not None:
            self.ex.upstream_writable(False)

    def resume_writing(self):
        if self.ex is not None:
            self.ex.upstream_writable(True)

    # used by exchanges
    def resend(self, Exchange ex):
        """Send ex's request again, on another connection to this worker."""
        self.pool.acquire(ex)

    cdef int attach(self, Exchange ex, bint head_only) except -1:
        self.ex = ex
        self.got_bytes = False
        self.sending = False
        self.sent_at = monotonic()
        self.parser.reset(head_only)
        self.decoded = [] if ex.wants_decoded() else None
        return 0

    cdef int send(self, bytes data) except -1:
        self.transport.write(data)
        return 0

    cdef int send2(self, bytes head, object body) except -1:
        if body is None or len(body) == 0:
            self.transport.write(head)
        elif len(body) <= 65536:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))
        return 0

    cdef int discard(self) except -1:
        """Detach from the exchange, whose response nobody wants: back to the
        pool if the response has already ended, else closed. (Reading the
        rest of it to reuse the connection would trust the worker to end it:
        a body that never ends would hold the connection forever.)"""
        self.ex = None
        if self.closed:
            return 0
        if self.parser.done() and not self.sending:
            self._message_done()
        else:
            self.abort()
        return 0

    cdef int abort(self) except -1:
        self.ex = None
        if not self.closed and self.transport is not None:
            self.transport.abort()
        return 0

    cdef int pause_reading(self) except -1:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()
        return 0

    cdef int resume_reading(self) except -1:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return 0

    cdef int _message_done(self) except -1:
        """The response ended: back to the pool, or closed if it can't be reused."""
        self.ex = None
        if self.reading_paused:
            self.resume_reading()
        if self.parser.keep_alive and not self.closed and not self.sending:
            self.pool.release(self)
        else:
            self.abort()
        return 0

    cdef int _fail(self, object exc, int stage) except -1:
        cdef Exchange ex = self.ex
        self.abort()
        if ex is not None:
            ex.upstream_failed(self, exc, stage)
        return 0
