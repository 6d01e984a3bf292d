# cython: language_level=3
"""The client-facing HTTP/1.1 server. A ClientConnection per TCP
connection parses requests with httptools and answers them strictly in
order (pipelining-safe): each request, once it is its turn, becomes a
RequestCycle (smg._fast.cycle) that its route answers. A request its route,
method or credentials refuse is answered when its headers are complete,
before any body byte is read. ServerCore holds what the connections of one
listener share."""

import hmac
import logging
from collections import deque

import httptools
import orjson

from smg._fast.clock cimport monotonic
from smg._fast.flow cimport FlowControl, ResponseSource
from smg._fast.request cimport Request, make_request_id
from smg._fast.routes cimport Route, AUTH_NONE, AUTH_DATA, error_body, anthropic_error_body
from smg._fast.cycle cimport Connection, RequestCycle, RequestHandler, new_cycle

from smg._fast.routes import Response

_log = logging.getLogger("smg.server")

# While a response is pending, a connection's pipelined requests may hold at
# most this many body bytes before the gateway stops reading it.
DEF PIPELINE_BUFFER_BYTES = 131072
# After answering a request whose body it will not read, the gateway
# half-closes and drops input until the client closes, at most this long:
# closing with unread input would reset the connection, and the client
# could lose the answer.
DEF LINGER_SECS = 5.0

_TOO_MANY = error_body(503, "too_many_connections",
                       "The gateway is at its connection limit and no connection is idle")
_TOO_LARGE = "Request body exceeded the payload limit (max_payload_size)"
_CORS_EXPOSE = b"access-control-expose-headers: x-request-id, x-smg-error-code, retry-after\r\n"
_CORS_ANY = b"access-control-allow-origin: *\r\n" + _CORS_EXPOSE
_CORS_PREFLIGHT = (b"access-control-allow-methods: GET, POST, PUT, PATCH, DELETE, OPTIONS\r\n"
                   b"access-control-max-age: 86400\r\n")


cdef class ServerCore:

    def __init__(self, loop, long long max_payload=536870912, double header_timeout=30.0,
                 double idle_timeout=90.0, api_key=None, admin_api_key=None,
                 long long max_header_bytes=65536, int max_headers=100, int max_pipeline=16):
        self.routes = {}
        self.prefix_routes = []
        self.not_found = Route("unmatched", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
        self.loop = loop
        self.max_payload = max_payload
        self.max_buffered_body = -1
        self.body_stall_timeout = 300.0
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.max_pipeline = max_pipeline
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.api_key = api_key.encode() if api_key else None
        admin = admin_api_key or api_key
        self.admin_api_key = admin.encode() if admin else None
        self.connections = set()
        self.date_header = b""
        self.shutting_down = False
        self.max_connections = 0
        self.shed_total = 0
        self.shed_logged_at = -1e9
        self.id_headers = None
        self.key_headers = None
        self.cors_origins = None
        self.cors_any = False

    def set_cors_origins(self, origins):
        """Origins a browser may call the gateway from ('*' alone: any)."""
        if not origins:
            self.cors_origins = None
            self.cors_any = False
        else:
            self.cors_any = list(origins) == ["*"]
            self.cors_origins = frozenset(o.rstrip("/").encode() for o in origins)

    cdef bint cors_allows(self, Request req):
        """Sets req.cors when the request comes from an allowed origin."""
        if self.cors_origins is None or req.origin is None:
            return False
        if self.cors_any:
            req.cors = _CORS_ANY
            return True
        if req.origin in self.cors_origins:
            req.cors = b"access-control-allow-origin: " + req.origin + b"\r\nvary: Origin\r\n" + _CORS_EXPOSE
            return True
        return False

    def set_routing_key_headers(self, names):
        """Take the routing key from these headers, in this order, instead of
        X-SMG-Routing-Key."""
        self.key_headers = {n.lower().encode(): i for i, n in enumerate(names)} if names else None

    def set_request_id_headers(self, names):
        """Take request ids from these headers, in this order, instead of the
        defaults (x-request-id, x-correlation-id, x-trace-id, request-id)."""
        self.id_headers = {n.lower().encode(): i for i, n in enumerate(names)} if names else None

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
        if self.cors_origins is not None and self.cors_allows(req) and req.method == b"OPTIONS" \
                and req.cors_method is not None:
            # a CORS preflight: answered here, before route, method and auth
            # (browsers send no credentials with it)
            req.route = self.not_found if self.resolve(req.path) is None else self.resolve(req.path)
            if req.request_id is None:
                req.request_id = make_request_id(b"req-")
            req.refusal = (200, b"", b"text/plain", req.cors + _CORS_PREFLIGHT
                           + b"access-control-allow-headers: "
                           + (req.cors_headers if req.cors_headers is not None else b"*") + b"\r\n", None)
            return 0
        route = self.resolve(req.path)
        if route is None:
            req.route = self.not_found
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
            message = f"Invalid URL ({req.method.decode('latin-1')} {req.path})"
            req.refusal = (405, anthropic_error_body(405, message, req.request_id) if route.anthropic
                           else error_body(405, "method_not_allowed", message),
                           b"application/json", b"x-smg-error-code: method_not_allowed\r\n" + route.allow_header,
                           "method_not_allowed")
            return 0
        if route.auth != AUTH_NONE:
            expected = self.api_key if route.auth == AUTH_DATA else self.admin_api_key
            if expected is None:
                return 0
            if route.anthropic and req.authorization is None and req.x_api_key is not None:
                # Anthropic clients send their key as x-api-key
                if not hmac.compare_digest(req.x_api_key, expected):
                    req.refusal = (401, anthropic_error_body(401, "Invalid API key", req.request_id),
                                   b"application/json", b"x-smg-error-code: invalid_api_key\r\n", "invalid_api_key")
                return 0
            if route.anthropic:
                if req.authorization is None or not hmac.compare_digest(bearer_token(req.authorization), expected):
                    req.refusal = (401, anthropic_error_body(
                        401, "Invalid API key" if req.authorization is not None else
                        "Missing API key: send it as `x-api-key: <key>` or `Authorization: Bearer <key>`",
                        req.request_id), b"application/json",
                        b"x-smg-error-code: invalid_api_key\r\nwww-authenticate: Bearer realm=\"data-plane\"\r\n",
                        "invalid_api_key")
                return 0
            if req.authorization is None:
                req.refusal = (401, orjson.dumps({"error": {
                    "message": "Missing API key: send it as `Authorization: Bearer <key>`",
                    "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}),
                    b"application/json",
                    b"x-smg-error-code: invalid_api_key\r\nwww-authenticate: Bearer realm=\"data-plane\"\r\n",
                    "invalid_api_key")
            elif not hmac.compare_digest(bearer_token(req.authorization), expected):
                req.refusal = (401, orjson.dumps({"error": {
                    "message": "Invalid API key", "type": "invalid_request_error", "param": None,
                    "code": "invalid_api_key"}}),
                    b"application/json",
                    b"x-smg-error-code: invalid_api_key\r\n"
                    b"www-authenticate: Bearer realm=\"data-plane\", error=\"invalid_token\"\r\n",
                    "invalid_api_key")
        return 0

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


cdef bytes bearer_token(bytes authorization):
    """The token of `Authorization: Bearer <token>` (the scheme in any case,
    as HTTP defines it), or b"" for any other form."""
    if len(authorization) > 7 and authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip()
    return b""


def _last_activity(ClientConnection conn):
    return conn.last_activity


cdef class PyHandlerDone:
    """Completes a request whose Python handler returned an awaitable."""
    cdef RequestCycle cycle

    def __init__(self, RequestCycle cycle):
        self.cycle = cycle

    def __call__(self, task):
        if self.cycle.done:
            return
        if task.cancelled():
            self.cycle.respond_error(503, "shutting_down", "request cancelled")
            return
        exc = task.exception()
        if exc is not None:
            _log.error("handler for %s failed: %r", self.cycle.req.path, exc, exc_info=exc)
            self.cycle.respond_error(500, "internal_error", "internal error")
            return
        _send_py_response(self.cycle, task.result())


cdef _send_py_response(RequestCycle cycle, resp):
    if not isinstance(resp, Response):
        cycle.respond_error(500, "internal_error", "handler returned no response")
        return
    cycle.respond(resp.status, resp.body, resp.content_type, resp.headers, resp.error_code)


class _Refused(Exception):
    pass


cdef class ClientConnection(Connection):

    def __init__(self, ServerCore core):
        self.core = core
        self.transport = None
        self.flow = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing = None
        self.active = None
        self.pending = deque()
        self.closed = False
        self.pending_bytes = 0
        self.lingering = False
        self.linger_until = 0.0
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
        self.flow = FlowControl(transport)
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
                self.refuse(self.error_status, self.error_code, self.error_message)
            else:
                self.refuse(400, "bad_request", f"malformed HTTP request: {e}")

    def eof_received(self):
        # The client closed its side. A half-close that still waits for its
        # answers is rare in HTTP; a client that went away is common, and
        # its requests should stop costing the workers. As nginx does for
        # proxied requests, treat EOF as the client leaving.
        return False

    def connection_lost(self, exc):
        cdef RequestCycle cycle = self.active
        self.closed = True
        self.core.connections.discard(self)
        self.active = None
        if cycle is not None:
            cycle.lost()
        self.pending.clear()
        self.parsing = None

    def pause_writing(self):
        self.flow.pause_writing()

    def resume_writing(self):
        self.flow.resume_writing()

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
            self.fail_parse(414, "uri_too_long", "request line too long")

    def on_header(self, bytes name, bytes value):
        cdef Request req = self.parsing
        req.header_bytes += len(name) + len(value) + 4
        req.header_count += 1
        if req.header_bytes > self.core.max_header_bytes or req.header_count > self.core.max_headers:
            self.fail_parse(431, "request_header_fields_too_large", "request headers too large")
        if self.core.id_headers is not None or self.core.key_headers is not None:
            self.configured_header(req, name.lower(), value)
        req.set_header(name, value)

    cdef int configured_header(self, Request req, bytes lname, bytes value) except -1:
        """--request-id-headers and --routing-key-headers: note the value of
        one of the headers they name."""
        cdef dict names = self.core.id_headers
        if names is not None and lname in names:
            req.set_custom_id(names[lname], len(names), value)
        names = self.core.key_headers
        if names is not None and lname in names:
            req.set_custom_key(names[lname], len(names), value)
        return 0

    def on_headers_complete(self):
        cdef Request req = self.parsing
        cdef long long declared = 0
        if self.closed:
            return
        self.head_started = 0.0
        req.method = self.parser.get_method()
        req.http_minor = 0 if self.parser.get_http_version() == "1.0" else 1
        req.keep_alive = self.parser.should_keep_alive()
        if self.core.id_headers is not None and req.custom_ids is None:
            req.custom_ids = []  # none of --request-id-headers came: make an id
        req.take_client_id()
        if self.core.key_headers is not None:
            req.take_custom_key()
        if req.content_length is not None:
            try:
                declared = int(req.content_length)
            except ValueError:
                declared = -1
            if declared > self.core.max_payload:
                self.fail_parse(413, "request_body_too_large", _TOO_LARGE)
        self.core.classify(req)
        if req.refusal is not None:
            # refused on its headers: its body is never read, and a client
            # that is alone on the connection is answered at once
            if (declared > 0 or req.chunked) and self.active is None and not self.pending:
                req.keep_alive = False
                self.begin(req)
            return
        if (declared > 0 and req.expect is not None and req.expect.lower() == b"100-continue"
                and self.active is None and not self.pending and req.http_minor == 1):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.core.max_buffered_body >= 0 and (declared > self.core.max_buffered_body
                                                 or (self.core.max_buffered_body == 0 and req.chunked)) \
                and self.may_stream(req):
            self.begin(req, True)

    def on_body(self, bytes body):
        cdef Request req = self.parsing
        cdef RequestCycle cycle = self.active
        if req.refusal is not None:
            return  # never read: dropped
        if cycle is not None and cycle.req is req:
            # a streamed body: on to the call as it comes
            req.body_len += len(body)
            if cycle.done:
                return
            if req.body_len > self.core.max_payload:
                req.keep_alive = False
                cycle.source.body_failed(413, "request_body_too_large", _TOO_LARGE)
                return
            cycle.stream_part(body)
            return
        if req.body_len + len(body) > self.core.max_payload:
            self.fail_parse(413, "request_body_too_large", _TOO_LARGE)
        req.add_body(body)
        if req.chunked and req.body_len > self.core.max_buffered_body >= 0 and self.may_stream(req):
            # a chunked body grew past what is kept for retries: stream it from here
            self.begin(req, True)
            return
        if self.active is not None and self.pending_bytes + req.body_len > PIPELINE_BUFFER_BYTES:
            # a response is pending: bound what waits behind it
            self.flow.pause_reading()

    def on_message_complete(self):
        cdef Request req = self.parsing
        self.parsing = None
        if self.active is not None and self.active.req is req:
            if self.active.streaming and not self.active.done:
                self.active.stream_end()
            return  # streamed, or answered already (refused on its headers)
        if self.closed:
            return
        req.finish_body()
        if self.active is None and not self.pending:
            self.begin(req)
        else:
            self.pending.append(req)
            self.pending_bytes += req.body_len
            if not self.may_read_more():
                self.flow.pause_reading()

    def fail_parse(self, int status, str code, str message):
        """Stop parsing: the request breaks a limit (answered by refuse())."""
        self.error_status = status
        self.error_code = code
        self.error_message = message
        raise _Refused()

    cdef bint may_stream(self, Request req):
        """Handle `req` before its body has arrived: the route can, and no
        other request is ahead of it on this connection."""
        return (self.active is None and not self.pending and req.refusal is None and not self.closed
                and (<Route>req.route).native is not None
                and (<RequestHandler>(<Route>req.route).native).can_stream(req))

    cdef bint may_read_more(self):
        """Room for more pipelined requests behind the pending response."""
        return len(self.pending) < self.core.max_pipeline and self.pending_bytes < PIPELINE_BUFFER_BYTES

    def upgrade_requested(self):
        """The parser stopped at a protocol switch (Upgrade, CONNECT). The
        gateway switches no protocols: the request is answered as any other,
        once, and the connection ends after it (what follows is not HTTP)."""
        cdef Request last
        if self.parsing is not None:
            self.refuse(400, "upgrade_not_supported", "protocol upgrades are not supported")
            return
        if self.pending:
            last = self.pending[len(self.pending) - 1]
        elif self.active is not None:
            last = self.active.req
        else:
            last = None
        if last is not None:
            last.keep_alive = False
            self.flow.pause_reading()
        elif not self.closed:
            self.linger()

    # --- serving ---

    cdef int begin(self, Request req, bint streaming=False) except -1:
        """`req`'s turn: answer it, turning an unexpected error into a 500
        (or, once the response has begun, a closed connection) instead of a
        stuck client. `streaming`: its body is still arriving, and what has
        arrived goes to the cycle."""
        cdef RequestCycle cycle = new_cycle(self, req)
        self.active = cycle
        if streaming:
            cycle.streaming = True
            cycle.body_last_at = monotonic()
            if req.body_len:
                cycle.stream_part(req.finish_body())
                req.body = b""
        try:
            self.serve(cycle)
        except Exception as e:
            _log.error("%s %s failed: %r", req.method.decode("latin-1"), req.path, e, exc_info=True)
            if not cycle.done and cycle.source is None:
                cycle.respond_error(500, "internal_error", "internal error")
            else:
                self.abort()
        return 0

    cdef int serve(self, RequestCycle cycle) except -1:
        cdef Request req = cycle.req
        cdef Route route = req.route
        cdef tuple refusal = req.refusal
        route.count_request(req.method)
        if refusal is not None:
            cycle.respond(refusal[0], refusal[1], refusal[2], refusal[3], refusal[4])
            return 0
        if route.native is not None:
            (<RequestHandler>route.native).handle(cycle)
            return 0
        try:
            result = route.handler(req)
        except Exception as e:
            _log.error("handler for %s failed: %r", req.path, e, exc_info=True)
            cycle.respond_error(500, "internal_error", "internal error")
            return 0
        if isinstance(result, Response):
            _send_py_response(cycle, result)
        else:
            task = self.core.loop.create_task(result)
            task.add_done_callback(PyHandlerDone(cycle))
        return 0

    # --- Connection: what the cycles use ---

    cdef bytes date_header(self):
        return self.core.date_header

    cdef bint closes_after(self, Request req):
        """After this response the connection closes (when shutting down: once
        the requests already received on it are answered)."""
        return self.close_after or not req.keep_alive or (self.core.shutting_down and not self.pending)

    cdef int response_done(self, RequestCycle cycle) except -1:
        """`cycle`'s response is complete: close, or go on with the next request."""
        cdef Request nxt
        if self.active is not cycle:
            return 0
        self.active = None
        if self.closed:
            return 0
        if cycle.streaming and not cycle.body_ended:
            cycle.req.keep_alive = False  # answered before its body ended: the rest is not read
        if self.closes_after(cycle.req):
            if self.parsing is not None or self.close_after:
                self.linger()  # input is left unread
            else:
                self.closed = True
                self.transport.close()
            return 0
        if self.error_status:
            self.refuse(self.error_status, self.error_code, self.error_message)
            return 0
        self.last_activity = monotonic()
        if self.pending:
            nxt = self.pending.popleft()
            self.pending_bytes -= nxt.body_len
            if self.may_read_more():
                self.flow.resume_reading()
            self.begin(nxt)
        else:
            self.flow.resume_reading()
        return 0

    cpdef abort(self):
        """Drop the connection (after a broken upstream stream, or at shutdown)."""
        if not self.closed and self.transport is not None:
            self.transport.abort()

    # --- ending connections ---

    cdef int linger(self) except -1:
        """Close without resetting: send FIN after the answer, drop what
        still comes in, and close when the client does (LINGER_SECS at most)."""
        self.closed = True
        self.lingering = True
        self.linger_until = monotonic() + LINGER_SECS
        self.pending.clear()
        self.pending_bytes = 0
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.transport.close()
        return 0

    cdef int refuse(self, int status, str code, str message) except -1:
        """Answer a request the parser could not accept, then close."""
        cdef Request req
        cdef RequestCycle cycle
        self.error_status = status
        self.error_code = code
        self.error_message = message
        if self.active is not None:
            # finish the response in progress first; response_done() comes back here
            self.flow.pause_reading()
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
        req.refusal = None
        self.close_after = True
        self.error_status = 0
        cycle = new_cycle(self, req)
        self.active = cycle
        cycle.respond_error(status, code, message)
        return 0

    cdef int check_timeouts(self, double now) except -1:
        cdef ResponseSource source
        cdef RequestCycle cycle
        if self.closed:
            if self.lingering and now >= self.linger_until:
                self.lingering = False
                self.transport.abort()
            return 0
        if self.active is not None:
            cycle = self.active
            source = cycle.source
            if source is not None:
                if source.deadline > 0 and now >= source.deadline:
                    source.expired(now)
                elif (cycle.streaming and not cycle.body_ended and cycle.body_buffered == 0
                      and self.core.body_stall_timeout > 0 and now - cycle.body_last_at > self.core.body_stall_timeout):
                    # the worker has all the body sent so far and waits on the client
                    cycle.req.keep_alive = False
                    source.body_failed(408, "request_timeout", "the request body stalled "
                                       "(--stream-body-stall-timeout-secs)")
                else:
                    source.tick(now)
            return 0
        if self.head_started > 0.0:
            if self.core.header_timeout > 0 and now - self.head_started > self.core.header_timeout:
                self.refuse(408, "request_timeout", "request headers not received in time")
            return 0
        if self.parsing is not None:
            # a body is arriving: give up when it stalls for the idle timeout
            if self.core.idle_timeout > 0 and now - self.last_activity > self.core.idle_timeout:
                self.refuse(408, "request_timeout", "request body not received in time")
            return 0
        if self.core.idle_timeout > 0 and now - self.last_activity > self.core.idle_timeout:
            self.closed = True
            self.transport.close()
        return 0
