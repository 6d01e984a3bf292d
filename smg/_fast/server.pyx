# cython: language_level=3
"""The client-facing HTTP/1.1 server: one ClientConnection per TCP
connection, parsed by httptools, answering requests strictly in order
(pipelining-safe). Routes are either Python callables (admin, health,
model listing) or a RequestHandler written in Cython (the proxy)."""

import hmac
import logging
import os
from collections import deque
from http import HTTPStatus

import httptools
import orjson

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from smg._fast.clock cimport monotonic
from smg._fast.exchange cimport Exchange
from smg._fast.admission cimport Admission

_log = logging.getLogger("smg.server")

# --- constants -----------------------------------------------------------

# smg_http_request_duration_seconds buckets, as the reference exports them
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
           45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 480.0, 900.0, 1200.0, 1800.0,
           2700.0, 3600.0, 5400.0, 7200.0)
cdef double _BOUNDS[N_BUCKETS]
for _i, _b in enumerate(BUCKETS):
    _BOUNDS[_i] = _b
_BOUNDS[N_BUCKETS - 1] = 1e300

cdef dict _STATUS_LINES = {}
for _s in HTTPStatus:
    _STATUS_LINES[_s.value] = f"HTTP/1.1 {_s.value} {_s.phrase}\r\n".encode()
_STATUS_LINES[499] = b"HTTP/1.1 499 Client Closed Request\r\n"


cdef inline bytes status_line(int status):
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Status\r\n".encode()
    return <bytes>line


# header slots: lowercase name -> slot; common spellings pre-seeded so most
# headers need one dict lookup and no lower()
DEF H_IGNORE = 0
DEF H_AUTHORIZATION = 1
DEF H_TRACEPARENT = 2
DEF H_TRACESTATE = 3
DEF H_ROUTING_KEY = 4
DEF H_FORWARDED_FOR = 5
DEF H_CONTENT_TYPE = 6
DEF H_CONTENT_LENGTH = 7
DEF H_EXPECT = 8
DEF H_CONNECTION = 9
DEF H_ID0 = 10   # x-request-id
DEF H_ID1 = 11   # x-correlation-id
DEF H_ID2 = 12   # x-trace-id
DEF H_ID3 = 13   # request-id
DEF H_TRANSFER_ENCODING = 14

cdef dict _SLOTS = {}


cdef _seed_slots():
    names = {
        "authorization": H_AUTHORIZATION, "traceparent": H_TRACEPARENT, "tracestate": H_TRACESTATE,
        "x-smg-routing-key": H_ROUTING_KEY, "x-forwarded-for": H_FORWARDED_FOR,
        "content-type": H_CONTENT_TYPE, "content-length": H_CONTENT_LENGTH, "expect": H_EXPECT,
        "connection": H_CONNECTION, "x-request-id": H_ID0, "x-correlation-id": H_ID1,
        "x-trace-id": H_ID2, "request-id": H_ID3, "transfer-encoding": H_TRANSFER_ENCODING,
        "host": H_IGNORE, "user-agent": H_IGNORE, "accept": H_IGNORE, "accept-encoding": H_IGNORE,
        "accept-language": H_IGNORE, "origin": H_IGNORE, "referer": H_IGNORE, "cookie": H_IGNORE,
        "cache-control": H_IGNORE, "pragma": H_IGNORE, "te": H_IGNORE, "keep-alive": H_IGNORE,
    }
    for name, slot in names.items():
        for spelling in (name, name.title(), name.upper()):
            _SLOTS[spelling.encode()] = slot
    _SLOTS[b"X-Request-ID"] = H_ID0
    _SLOTS[b"X-Request-Id"] = H_ID0
    _SLOTS[b"X-SMG-Routing-Key"] = H_ROUTING_KEY
    _SLOTS[b"Content-type"] = H_CONTENT_TYPE

_seed_slots()


# While a response is pending, a connection's pipelined requests may hold at
# most this many body bytes before the gateway stops reading it.
DEF PIPELINE_BUFFER_BYTES = 4194304
# After answering a request whose body it will not read, the gateway
# half-closes and drops input until the client closes, at most this long:
# closing with unread input would reset the connection, and the client
# could lose the answer.
DEF LINGER_SECS = 5.0


# --- request ids ---------------------------------------------------------

cdef bytes _ALNUM = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
cdef unsigned long long _id_counter = 0
cdef char _id_base[12]


cdef _seed_ids():
    cdef bytes raw = os.urandom(12)
    for i in range(12):
        _id_base[i] = _ALNUM[raw[i] % 62]

_seed_ids()


cdef bytes make_request_id(bytes prefix):
    """prefix + 24 characters: 12 random per process, 12 from a counter."""
    global _id_counter
    cdef Py_ssize_t plen = len(prefix)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, plen + 24)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef unsigned long long c
    cdef int i
    _id_counter += 1
    # an odd multiplier is a bijection on 64-bit integers: unique, not sequential-looking
    c = _id_counter * <unsigned long long>11400714819323198485ULL
    for i in range(plen):
        p[i] = prefix[i]
    for i in range(12):
        p[plen + i] = _id_base[i]
    for i in range(11, -1, -1):
        p[plen + 12 + i] = _ALNUM[c % 62]
        c //= 62
    return out


# A client's request id is echoed and forwarded: a longer one, or one with
# characters outside printable ASCII, is ignored and the gateway makes one.
DEF MAX_REQUEST_ID = 128


cdef inline bint valid_request_id(bytes value):
    cdef Py_ssize_t i, n
    cdef const unsigned char* p
    if value is None:
        return False
    n = PyBytes_GET_SIZE(value)
    if n == 0 or n > MAX_REQUEST_ID:
        return False
    p = <const unsigned char*>PyBytes_AS_STRING(value)
    for i in range(n):
        if p[i] < 0x21 or p[i] > 0x7e:
            return False
    return True


# --- errors ----------------------------------------------------------------

cpdef bytes error_body(int status, str code, str message, str error_type=None):
    """The SMG error shape: {"error": {"type", "code", "message", "param"}}."""
    if error_type is None:
        error_type = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"type": error_type, "code": code, "message": message, "param": None}})


cdef class Histogram:

    def __cinit__(self):
        cdef int i
        for i in range(N_BUCKETS):
            self.counts[i] = 0
        self.total = 0.0
        self.count = 0

    cdef void observe(self, double value) noexcept:
        cdef int i = 0
        while value > _BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def snapshot(self):
        """(cumulative bucket counts for BUCKETS + +Inf, sum, count)."""
        cdef list out = []
        cdef long long acc = 0
        cdef int i
        for i in range(N_BUCKETS):
            acc += self.counts[i]
            out.append(acc)
        return out, self.total, self.count



cdef class Request:

    def __cinit__(self):
        self.url = b""
        self.method = b"GET"
        self.path = ""
        self.query = b""
        self.body = b""
        self.body_parts = None
        self.body_len = 0
        self.keep_alive = True
        self.http_minor = 1
        self.header_bytes = 0
        self.header_count = 0

    cdef bytes finish_body(self):
        if self.body_parts is not None:
            self.body = b"".join(self.body_parts)
            self.body_parts = None
        return self.body

    def __repr__(self):
        return f"<Request {self.method.decode()} {self.path}>"


cdef class RequestHandler:
    cdef int handle(self, ClientConnection conn, Request req) except -1:
        conn.respond_error(req, 500, "internal_error", "route has no handler")
        return 0


class Response:
    """What a Python route handler returns."""
    __slots__ = ("status", "body", "content_type", "headers", "error_code")

    def __init__(self, int status=200, bytes body=b"", bytes content_type=b"application/json",
                 bytes headers=b"", str error_code=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.error_code = error_code


def json_response(obj, int status=200, bytes headers=b""):
    return Response(status, orjson.dumps(obj), b"application/json", headers)


def text_response(str text, int status=200):
    return Response(status, text.encode(), b"text/plain; charset=utf-8")


def error_response(int status, str code, str message, str error_type=None, bytes headers=b""):
    return Response(status, error_body(status, code, message, error_type), b"application/json",
                    b"x-smg-error-code: " + code.encode() + b"\r\n" + headers, code)


cdef dict _AUTH_LEVELS = {"none": AUTH_NONE, "serving": AUTH_DATA, "admin": AUTH_ADMIN}


cdef class Route:

    def __init__(self, str path, methods, handler=None, RequestHandler native=None, str auth="none",
                 bytes id_prefix=b"req-"):
        """auth: "none", "serving" (--api-key) or "admin" (--admin-api-key, else --api-key)."""
        self.path = path
        self.methods = frozenset(m.encode() if isinstance(m, str) else m for m in methods)
        self.handler = handler
        self.native = native
        self.auth = _AUTH_LEVELS[auth]
        self.id_prefix = id_prefix
        self.allow_header = b"allow: " + b", ".join(sorted(self.methods)) + b"\r\n"
        self.requests = {}
        self.responses = {}
        self.durations = {}

    def __repr__(self):
        return f"<Route {self.path}>"

    cdef void record(self, bytes method, int status, str error_code, double seconds):
        cdef Histogram h
        key = (status, error_code)
        self.responses[key] = self.responses.get(key, 0) + 1
        h = self.durations.get(method)
        if h is None:
            h = Histogram()
            self.durations[method] = h
        h.observe(seconds)


cdef class ServerCore:

    def __init__(self, loop, long long max_payload=536870912, double header_timeout=30.0,
                 double idle_timeout=90.0, api_key=None, admin_api_key=None,
                 long long max_header_bytes=65536, int max_headers=100, int max_pipeline=16):
        self.routes = {}
        self.prefix_routes = []
        self.not_found = Route("unmatched", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        self.loop = loop
        self.max_payload = max_payload
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_pipeline = max_pipeline
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.api_key = f"Bearer {api_key}".encode() if api_key else None
        admin = admin_api_key or api_key
        self.admin_api_key = f"Bearer {admin}".encode() if admin else None
        self.connections = set()
        self.date_header = b""
        self.shutting_down = False
        self.max_connections = 0
        self.shed_total = 0
        self.shed_logged_at = -1e9
        self.admission = Admission()

    def add_route(self, Route route, bint prefix=False):
        if prefix:
            self.prefix_routes.append((route.path, route))
        else:
            self.routes[route.path] = route

    cpdef Route resolve(self, str path):
        route = self.routes.get(path)
        if route is not None:
            return <Route>route
        for prefix, r in self.prefix_routes:
            if path.startswith(prefix):
                return <Route>r
        return None

    def all_routes(self):
        return list(self.routes.values()) + [r for _, r in self.prefix_routes] + [self.not_found]

    def protocol_factory(self):
        return ClientConnection(self)

    def tick(self, double now=0.0):
        """Periodic housekeeping: connection timeouts, request deadlines."""
        cdef ClientConnection conn
        if now == 0.0:
            now = monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now)

    def make_room(self, ClientConnection newcomer):
        """Over max_connections: close the longest-idle keep-alive
        connections (a twentieth of the limit at once), so that running out
        of file descriptors sheds idle clients instead of refusing new ones.
        False when no connection is idle."""
        cdef ClientConnection conn
        cdef double now = monotonic()
        idle = [conn for conn in self.connections
                if conn is not newcomer and conn.active is None and conn.parsing is None and not conn.closed]
        if not idle:
            return False
        idle.sort(key=_last_activity)
        shed = idle[:max(1, self.max_connections // 20)]
        for conn in shed:
            conn.closed = True
            conn.transport.close()
        self.shed_total += len(shed)
        if now - self.shed_logged_at >= 60.0:
            self.shed_logged_at = now
            _log.warning("%d client connections: at the limit the file descriptors allow (%d); closing the %d "
                         "longest-idle keep-alive connections", len(self.connections), self.max_connections, len(shed))
        return True

    def close_idle(self):
        """Close connections with no request in progress (shutdown)."""
        cdef ClientConnection conn
        for conn in list(self.connections):
            if conn.active is None and conn.parsing is None:
                conn.abort()

    @property
    def active_requests(self):
        cdef ClientConnection conn
        cdef int n = 0
        for conn in self.connections:
            if conn.active is not None:
                n += 1
        return n


cdef class PyHandlerDone:
    """Completes a request whose Python handler returned an awaitable."""
    cdef ClientConnection conn
    cdef Request req

    def __init__(self, ClientConnection conn, Request req):
        self.conn = conn
        self.req = req

    def __call__(self, task):
        if self.conn.closed or self.conn.active is not self.req:
            return
        if task.cancelled():
            self.conn.respond_error(self.req, 503, "shutting_down", "request cancelled")
            return
        exc = task.exception()
        if exc is not None:
            _log.error("handler for %s failed: %r", self.req.path, exc, exc_info=exc)
            self.conn.respond_error(self.req, 500, "internal_error", "internal error")
            return
        _send_py_response(self.conn, self.req, task.result())


cdef _send_py_response(ClientConnection conn, Request req, resp):
    if not isinstance(resp, Response):
        conn.respond_error(req, 500, "internal_error", "handler returned no response")
        return
    conn.respond(req, resp.status, resp.body, resp.content_type, resp.headers, resp.error_code)


_TOO_MANY = error_body(503, "too_many_connections",
                       "The gateway is at its connection limit and no connection is idle")


class _Refused(Exception):
    pass


def _last_activity(ClientConnection conn):
    return conn.last_activity


cdef class ClientConnection:

    def __init__(self, ServerCore core):
        self.core = core
        self.transport = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing = None
        self.active = None
        self.pending = deque()
        self.exchange = None
        self.closed = False
        self.reading_paused = False
        self.pending_bytes = 0
        self.lingering = False
        self.linger_until = 0.0
        self.write_paused = False
        self.close_after = False
        self.error_status = 0
        self.error_code = None
        self.error_message = None
        self.last_activity = monotonic()
        self.head_started = 0.0
        self.peer = None

    # --- asyncio protocol ---

    def connection_made(self, transport):
        self.transport = transport
        self.core.connections.add(self)
        self.peer = transport.get_extra_info("peername")
        if self.core.shutting_down:
            transport.close()
        elif 0 < self.core.max_connections < len(self.core.connections) and not self.core.make_room(self):
            self.closed = True
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                            b"x-smg-error-code: too_many_connections\r\nretry-after: 1\r\n"
                            b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(_TOO_MANY) + _TOO_MANY)
            transport.close()

    def data_received(self, bytes data):
        if self.closed:
            return
        self.last_activity = monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgrade_requested()
        except (httptools.HttpParserError, _Refused) as e:
            if self.error_status:
                self._refuse(self.error_status, self.error_code, self.error_message)
            else:
                self._refuse(400, "bad_request", f"malformed HTTP request: {e}")

    def eof_received(self):
        # The client closed its side. A half-close that still waits for its
        # answers is rare in HTTP; a client that went away is common, and
        # its requests should stop costing the workers. As nginx does for
        # proxied requests, treat EOF as the client leaving.
        return False

    def connection_lost(self, exc):
        cdef Request req = self.active
        cdef Exchange ex = self.exchange
        cdef Admission adm
        self.closed = True
        self.core.connections.discard(self)
        self.exchange = None
        if ex is not None:
            ex.client_lost()
        if req is not None:
            self.active = None
            if req.admission is not None:
                adm = req.admission
                req.admission = None
                adm.leave()
            (<Route>req.route).record(req.method, 499, "client_closed_request", monotonic() - req.start)
        self.pending.clear()
        self.parsing = None

    def pause_writing(self):
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.client_pause()

    def resume_writing(self):
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.client_resume()

    # --- httptools callbacks ---

    def on_message_begin(self):
        cdef Request req = Request()
        req.start = monotonic()
        self.parsing = req
        self.head_started = req.start

    def on_url(self, bytes url):
        cdef Request req = self.parsing
        req.url = url if not req.url else req.url + url
        req.header_bytes += len(url)
        if req.header_bytes > self.core.max_header_bytes:
            self.error_status = 414
            self.error_code = "uri_too_long"
            self.error_message = "request line too long"
            raise _Refused()

    def on_header(self, bytes name, bytes value):
        cdef Request req = self.parsing
        req.header_bytes += len(name) + len(value) + 4
        req.header_count += 1
        if req.header_bytes > self.core.max_header_bytes or req.header_count > self.core.max_headers:
            self.error_status = 431
            self.error_code = "request_header_fields_too_large"
            self.error_message = "request headers too large"
            raise _Refused()
        slot = _SLOTS.get(name)
        if slot is None:
            slot = _SLOTS.get(name.lower(), H_IGNORE)
        if slot == H_IGNORE:
            return
        if slot == H_AUTHORIZATION:
            req.authorization = value
        elif slot == H_CONTENT_TYPE:
            req.content_type = value
        elif slot == H_CONTENT_LENGTH:
            req.content_length = value
        elif slot == H_ID0:
            if value and req.id_x_request_id is None:
                req.id_x_request_id = value
        elif slot == H_ID1:
            if value and req.id_x_correlation_id is None:
                req.id_x_correlation_id = value
        elif slot == H_ID2:
            if value and req.id_x_trace_id is None:
                req.id_x_trace_id = value
        elif slot == H_ID3:
            if value and req.id_request_id is None:
                req.id_request_id = value
        elif slot == H_TRACEPARENT:
            req.traceparent = value
        elif slot == H_TRACESTATE:
            req.tracestate = value
        elif slot == H_ROUTING_KEY:
            req.routing_key = value
        elif slot == H_FORWARDED_FOR:
            req.forwarded_for = value
        elif slot == H_EXPECT:
            req.expect = value
        elif slot == H_CONNECTION:
            req.connection = value
        elif slot == H_TRANSFER_ENCODING:
            req.chunked = True

    def on_headers_complete(self):
        cdef Request req = self.parsing
        cdef long long declared = 0
        if self.closed:
            return
        self.head_started = 0.0
        req.method = self.parser.get_method()
        req.http_minor = 0 if self.parser.get_http_version() == "1.0" else 1
        req.keep_alive = self.parser.should_keep_alive()
        if valid_request_id(req.id_x_request_id):
            req.request_id = req.id_x_request_id
        elif valid_request_id(req.id_x_correlation_id):
            req.request_id = req.id_x_correlation_id
        elif valid_request_id(req.id_x_trace_id):
            req.request_id = req.id_x_trace_id
        elif valid_request_id(req.id_request_id):
            req.request_id = req.id_request_id
        req.id_from_client = req.request_id is not None
        if req.content_length is not None:
            try:
                declared = int(req.content_length)
            except ValueError:
                declared = -1
            if declared > self.core.max_payload:
                self.error_status = 413
                self.error_code = "request_body_too_large"
                self.error_message = "Request body exceeded the payload limit (max_payload_size)"
                raise _Refused()
        self.classify(req)
        if req.refusal is not None:
            # refused on its headers: its body is never read, and a client
            # that is alone on the connection is answered at once
            if (declared > 0 or req.chunked) and self.active is None and not self.pending:
                req.keep_alive = False
                self.active = req
                self.respond_refusal(req)
            return
        if req.content_length is not None:
            if (declared > 0 and req.expect is not None and req.expect.lower() == b"100-continue"
                    and self.active is None and not self.pending and req.http_minor == 1):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, bytes body):
        cdef Request req = self.parsing
        if req.refusal is not None:
            return  # never read: dropped
        req.body_len += len(body)
        if (self.active is not None and not self.reading_paused
                and self.pending_bytes + req.body_len > PIPELINE_BUFFER_BYTES):
            # a response is pending: bound what waits behind it
            self.reading_paused = True
            self.transport.pause_reading()
        if req.body_len > self.core.max_payload:
            self.error_status = 413
            self.error_code = "request_body_too_large"
            self.error_message = "Request body exceeded the payload limit (max_payload_size)"
            raise _Refused()
        if req.body_parts is not None:
            req.body_parts.append(body)
        elif req.body:
            req.body_parts = [req.body, body]
        else:
            req.body = body

    def on_message_complete(self):
        cdef Request req = self.parsing
        self.parsing = None
        if self.closed or self.active is req:
            return  # answered already (refused on its headers), or closing
        req.finish_body()
        if self.active is None and not self.pending:
            self.safe_dispatch(req)
        else:
            self.pending.append(req)
            self.pending_bytes += req.body_len
            if not self.reading_paused and not self.may_read_more():
                self.reading_paused = True
                self.transport.pause_reading()

    cdef bint may_read_more(self):
        """Room for more pipelined requests behind the pending response."""
        return len(self.pending) < self.core.max_pipeline and self.pending_bytes < PIPELINE_BUFFER_BYTES

    def upgrade_requested(self):
        """The parser stopped at a protocol switch (Upgrade, CONNECT). The
        gateway switches no protocols: the request is answered as any other,
        once, and the connection ends after it (what follows is not HTTP)."""
        cdef Request last
        if self.parsing is not None:
            self._refuse(400, "upgrade_not_supported", "protocol upgrades are not supported")
            return
        last = self.pending[len(self.pending) - 1] if self.pending else self.active
        if last is not None:
            last.keep_alive = False
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
        elif not self.closed:
            self.linger()

    # --- serving ---

    cdef int safe_dispatch(self, Request req) except -1:
        """dispatch(), turning an unexpected error into a 500 (or, once the
        response has begun, a closed connection) instead of a stuck client."""
        try:
            self.dispatch(req)
        except Exception as e:
            _log.error("%s %s failed: %r", req.method.decode("latin-1"), req.path, e, exc_info=True)
            if self.active is req and self.exchange is None:
                if req.request_id is None:
                    req.request_id = b"req-error"
                if req.route is None:
                    req.route = self.core.not_found
                self.respond_error(req, 500, "internal_error", "internal error")
            else:
                self.abort()
        return 0

    cdef int classify(self, Request req) except -1:
        """When the headers are complete, before any body byte is kept: the
        route, the request id, and whether the route, the method or the
        credentials refuse the request (req.refusal)."""
        cdef Route route
        cdef bytes url = req.url
        cdef bytes expected
        cdef Py_ssize_t qpos = url.find(b"?")
        if qpos >= 0:
            req.query = url[qpos + 1:]
            url = url[:qpos]
        req.path = url.decode("latin-1")
        route = self.core.resolve(req.path)
        if route is None:
            req.route = self.core.not_found
            if req.request_id is None:
                req.request_id = make_request_id(b"req-")
            req.refusal = (404, error_body(404, "unknown_url",
                                           f"Invalid URL ({req.method.decode('latin-1')} {req.path})"),
                           b"application/json", b"x-smg-error-code: unknown_url\r\n", "unknown_url")
            return 0
        req.route = route
        if req.request_id is None:
            req.request_id = make_request_id(route.id_prefix)
        if req.method not in route.methods and not (req.method == b"HEAD" and b"GET" in route.methods):
            req.refusal = (405, error_body(405, "method_not_allowed",
                                           f"Invalid URL ({req.method.decode('latin-1')} {req.path})"),
                           b"application/json", b"x-smg-error-code: method_not_allowed\r\n" + route.allow_header,
                           "method_not_allowed")
            return 0
        if route.auth != AUTH_NONE:
            expected = self.core.api_key if route.auth == AUTH_DATA else self.core.admin_api_key
            if expected is None:
                return 0
            if req.authorization is None:
                req.refusal = (401, orjson.dumps({"error": {
                    "message": "Missing API key: send it as `Authorization: Bearer <key>`",
                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}),
                    b"application/json",
                    b"x-smg-error-code: invalid_api_key\r\nwww-authenticate: Bearer realm=\"data-plane\"\r\n",
                    "invalid_api_key")
            elif not hmac.compare_digest(req.authorization, expected):
                req.refusal = (401, orjson.dumps({"error": {
                    "message": "Invalid API key", "type": "invalid_request_error", "param": None,
                    "code": "invalid_api_key"}}),
                    b"application/json",
                    b"x-smg-error-code: invalid_api_key\r\n"
                    b"www-authenticate: Bearer realm=\"data-plane\", error=\"invalid_token\"\r\n",
                    "invalid_api_key")
        return 0

    def respond_refusal(self, Request req):
        cdef Route route = req.route
        route.requests[req.method] = route.requests.get(req.method, 0) + 1
        status, body, content_type, headers, code = req.refusal
        self.respond(req, status, body, content_type, headers, code)

    cdef int dispatch(self, Request req) except -1:
        cdef Route route = req.route
        self.active = req
        if req.refusal is not None:
            self.respond_refusal(req)
            return 0
        route.requests[req.method] = route.requests.get(req.method, 0) + 1
        if route.native is not None:
            route.native.handle(self, req)
            return 0
        try:
            result = route.handler(req)
        except Exception as e:
            _log.error("handler for %s failed: %r", req.path, e, exc_info=True)
            self.respond_error(req, 500, "internal_error", "internal error")
            return 0
        if isinstance(result, Response):
            _send_py_response(self, req, result)
        else:
            task = self.core.loop.create_task(result)
            task.add_done_callback(PyHandlerDone(self, req))
        return 0

    cdef bint client_closes(self, Request req):
        """After this response the connection closes (when shutting down: once
        the requests already received on it are answered)."""
        return self.close_after or not req.keep_alive or (self.core.shutting_down and not self.pending)

    cdef int write(self, bytes data) except -1:
        if not self.closed:
            self.transport.write(data)
        return 0

    cpdef respond(self, Request req, int status, bytes body, bytes content_type, bytes extra_headers=b"",
                  str error_code=None):
        """Send a complete response to `req` and move on to the next request."""
        cdef list parts
        if self.closed:
            return
        parts = [status_line(status), b"content-type: ", content_type,
                 b"\r\ncontent-length: ", str(len(body)).encode(),
                 b"\r\nx-request-id: ", req.request_id if req.request_id is not None else b"",
                 b"\r\n", extra_headers, self.core.date_header]
        if self.client_closes(req):
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if req.method != b"HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))
        self.finish(req, status, error_code)

    cpdef respond_error(self, Request req, int status, str code, str message, str error_type=None):
        self.respond(req, status, error_body(status, code, message, error_type), b"application/json",
                     b"x-smg-error-code: " + code.encode() + b"\r\n", code)

    cpdef finish(self, Request req, int status, str error_code=None):
        """The response to `req` has been written in full."""
        cdef Request nxt
        cdef Admission adm = req.admission
        if adm is not None:
            req.admission = None
            adm.leave()
        if req.route is not None:
            (<Route>req.route).record(req.method, status, error_code, monotonic() - req.start)
        if self.active is not req:
            return
        self.active = None
        self.exchange = None
        if self.closed:
            return
        if self.client_closes(req):
            if self.parsing is not None or self.close_after:
                self.linger()  # input is left unread
            else:
                self.closed = True
                self.transport.close()
            return
        if self.error_status:
            self._refuse(self.error_status, self.error_code, self.error_message)
            return
        self.last_activity = monotonic()
        if self.pending:
            nxt = self.pending.popleft()
            self.pending_bytes -= nxt.body_len
            if self.reading_paused and self.may_read_more():
                self.reading_paused = False
                self.transport.resume_reading()
            self.safe_dispatch(nxt)
        elif self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    cdef int linger(self) except -1:
        """Close without resetting: send FIN after the answer, drop what
        still comes in, and close when the client does (LINGER_SECS at most)."""
        self.closed = True
        self.lingering = True
        self.linger_until = monotonic() + LINGER_SECS
        self.pending.clear()
        self.pending_bytes = 0
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        return 0

    cpdef abort(self):
        """Drop the connection (after a broken upstream stream, or at shutdown)."""
        if not self.closed and self.transport is not None:
            self.transport.abort()

    cdef int _refuse(self, int status, str code, str message) except -1:
        """Answer a request the parser could not accept, then close."""
        cdef Request req
        self.error_status = status
        self.error_code = code
        self.error_message = message
        if self.active is not None:
            # finish the response in progress first; finish() comes back here
            if not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()
            return 0
        req = self.parsing if self.parsing is not None else Request()
        self.parsing = None
        self.pending.clear()
        req.keep_alive = False
        if req.request_id is None:
            req.request_id = make_request_id(b"req-")
        if req.start == 0.0:
            req.start = monotonic()
        req.route = self.core.not_found
        self.active = req
        self.close_after = True
        self.error_status = 0
        self.respond_error(req, status, code, message)
        return 0

    cdef int check_timeouts(self, double now) except -1:
        if self.closed:
            if self.lingering and now >= self.linger_until:
                self.lingering = False
                self.transport.abort()
            return 0
        if self.exchange is not None:
            if self.exchange.deadline > 0 and now >= self.exchange.deadline:
                self.exchange.expired(now)
            return 0
        if self.active is not None:
            return 0
        if self.head_started > 0.0:
            if self.core.header_timeout > 0 and now - self.head_started > self.core.header_timeout:
                self._refuse(408, "request_timeout", "request headers not received in time")
            return 0
        if self.parsing is not None:
            # a body is arriving: give up when it stalls for the idle timeout
            if self.core.idle_timeout > 0 and now - self.last_activity > self.core.idle_timeout:
                self._refuse(408, "request_timeout", "request body not received in time")
            return 0
        if self.core.idle_timeout > 0 and now - self.last_activity > self.core.idle_timeout:
            self.closed = True
            self.transport.close()
        return 0
