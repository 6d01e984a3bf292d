# cython: language_level=3
"""Forwarding a proxied request to a worker and relaying the response.

ProxyHandler is the route handler of every proxied POST route: it parses
the JSON body once (for the model and the routing text), picks a worker
group and hands the request to a ProxyCall. A ProxyCall sends the client's
body bytes unchanged over a pooled keep-alive connection and relays the
response as it arrives (chunk framing passed through), retrying on another
worker while nothing has reached the client yet."""

import logging

import orjson

from cpython.bytes cimport PyBytes_GET_SIZE
from smg._fast.clock cimport monotonic
from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport Exchange, FAIL_CONNECT, FAIL_BEFORE_HEAD, FAIL_BODY
from smg._fast.upstream cimport UpstreamPool, UpstreamConnection, ConnectWaiter
from smg._fast.admission cimport Admission
from smg._fast.server cimport ClientConnection, Request, RequestHandler, ServerCore
from smg._fast.worker cimport Worker, TYPE_REGULAR
from smg._fast.policies cimport Router, WorkerGroup, rand64
from smg._fast.routing_text cimport routing_text, invalid_field

from smg._fast.routing_text import ENDPOINT_NAMES
from smg._fast.admission import queue_or_reject
from smg._fast.server import error_body
from smg._fast.upstream import UpstreamClosed
from smg._fast.worker import TYPE_NAMES

_log = logging.getLogger("smg.proxy")

cdef dict _STATUS_LINES = {}
_TYPE_NAMES = TYPE_NAMES


cdef bytes upstream_status_line(ResponseParser p):
    key = (p.status, p.reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (p.status, p.reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    return <bytes>line


cdef bint retryable_status(int status) noexcept:
    return status == 408 or status == 429 or status == 500 or status == 502 or status == 503 or status == 504


cdef bint failure_status(int status) noexcept:
    """Counts against the worker's circuit breaker."""
    return status == 408 or status == 429 or status >= 500


cdef bytes relay_head(ResponseParser p, ClientConnection conn, Request req, Worker w, bint decoded,
                      bint* wrap, long long content_length=-1):
    """The head of the response relayed to the client. The upstream's framing
    is kept when the body passes through unchanged (chunks included);
    `decoded` bodies (payload only) and bodies that end with the connection
    are re-chunked for HTTP/1.1 clients (*wrap set), and HTTP/1.0 clients
    get the body unframed with the connection closed after it.
    content_length >= 0 announces a body the caller rewrote, -2 a rewritten
    body of unknown length (the upstream's Content-Length no longer holds)."""
    cdef list parts = [upstream_status_line(p), p.forward_headers]
    wrap[0] = False
    if content_length == -1 and p.content_length >= 0 and not p.chunked:
        content_length = p.content_length
    if content_length >= 0:
        parts.append(b"content-length: %d\r\n" % content_length)
    elif req.http_minor == 0:
        req.keep_alive = False
    elif p.chunked and not decoded:
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts.append(b"transfer-encoding: chunked\r\n")
        wrap[0] = True
    parts.append(w.url_header)
    parts.append(b"x-request-id: ")
    parts.append(req.request_id)
    parts.append(b"\r\n")
    parts.append(conn.core.date_header)
    if conn.client_closes(req):
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


cdef bytes wrap_chunk(bytes data, Py_ssize_t off, Py_ssize_t n):
    return b"%x\r\n" % n + data[off:off + n] + b"\r\n"


cdef bint end_stream_with_error(ClientConnection conn, Request req, ResponseParser p, bint wrapped, int status,
                                str code, str message):
    """End an event stream that broke off (the worker failed, the request
    timed out) the way clients understand: an error event, `data: [DONE]`,
    then the end of the chunked body. `wrapped`: the gateway frames the
    chunks itself. False when the stream cannot take them: not SSE, not
    chunked to the client (HTTP/1.0 gets the body unframed), or cut inside
    one of the worker's chunks."""
    if req.http_minor == 0 or p is None or p.content_type is None \
            or not p.content_type.startswith(b"text/event-stream"):
        return False
    if not wrapped and not (p.chunked and p.between_chunks()):
        return False
    event = b"data: " + error_body(status, code, message) + b"\n\ndata: [DONE]\n\n"
    conn.write(b"%x\r\n" % len(event) + event + b"\r\n0\r\n\r\n")
    return True


cdef class ProxySettings:
    """What all proxied routes share: the router, retry and timeout settings,
    and the proxy's counters (read by smg.metrics)."""

    def __init__(self, Router router, loop, int max_attempts=5, double backoff_initial=0.05,
                 double backoff_max=30.0, double backoff_multiplier=1.5, double backoff_jitter=0.2,
                 double request_timeout=1800.0):
        self.router = router
        self.loop = loop
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_multiplier = backoff_multiplier
        self.backoff_jitter = backoff_jitter
        self.request_timeout = request_timeout
        self.retries = {}
        self.retries_exhausted = {}

    cdef double backoff(self, int retry_index):
        cdef double d = self.backoff_initial * (self.backoff_multiplier ** retry_index)
        cdef double r
        if d > self.backoff_max:
            d = self.backoff_max
        if self.backoff_jitter > 0:
            r = (rand64() >> 11) * (1.0 / 9007199254740992.0)
            d *= 1.0 + self.backoff_jitter * (2.0 * r - 1.0)
        return d if d > 0 else 0.0

    cdef int count_retry(self, int worker_type, str endpoint) except -1:
        key = (_TYPE_NAMES[worker_type], endpoint)
        self.retries[key] = self.retries.get(key, 0) + 1
        return 0

    cdef int count_exhausted(self, int worker_type, str endpoint) except -1:
        key = (_TYPE_NAMES[worker_type], endpoint)
        self.retries_exhausted[key] = self.retries_exhausted.get(key, 0) + 1
        return 0


cdef WorkerGroup resolve_group(Router router, ClientConnection conn, Request req, str model, int worker_type):
    """The candidates of `worker_type` for `model` (None: the only model
    served), or None after answering the client with an error."""
    cdef WorkerGroup g
    cdef list groups
    cdef str kind = "" if worker_type == TYPE_REGULAR else _TYPE_NAMES[worker_type] + " "
    if model is not None:
        g = router.group(worker_type, model)
        if g is None:
            if not router.groups_of(worker_type):
                conn.respond_error(req, 503, "no_available_workers", f"No available {kind}workers")
            else:
                conn.respond_error(req, 404, "model_not_found", f"No {kind}worker available for model '{model}'")
        return g
    groups = router.groups_of(worker_type)
    if len(groups) == 1:
        return <WorkerGroup>groups[0]
    if not groups:
        conn.respond_error(req, 503, "no_available_workers", f"No available {kind}workers")
        return None
    # several models: only one may have ready workers
    ready = [g for g in groups if (<WorkerGroup>g).ready]
    if len(ready) == 1:
        return <WorkerGroup>ready[0]
    conn.respond_error(req, 400, "missing_model",
                       "The workers serve several models ("
                       + ", ".join(sorted((<WorkerGroup>g).model_id for g in groups))
                       + "); name one in the request's 'model' field")
    return None


cdef object parse_body(ClientConnection conn, Request req, int endpoint):
    """The request body as a dict, or None after answering with a 400."""
    try:
        obj = orjson.loads(req.body)
    except orjson.JSONDecodeError as e:
        conn.respond_error(req, 400, "json_parse_error", f"Failed to parse the request body as JSON: {e}")
        return None
    if type(obj) is not dict:
        conn.respond_error(req, 400, "invalid_request", "The request body must be a JSON object")
        return None
    model = (<dict>obj).get("model")
    if model is not None and type(model) is not str:
        conn.respond_error(req, 400, "invalid_request", "'model' must be a string")
        return None
    why = invalid_field(endpoint, <dict>obj)
    if why is not None:
        conn.respond_error(req, 400, "invalid_request", why)
        return None
    return obj


cdef bytes routing_key(Request req):
    """consistent_hashing's key: X-SMG-Routing-Key, else Authorization, else X-Forwarded-For."""
    if req.routing_key is not None:
        return req.routing_key
    if req.authorization is not None:
        return req.authorization
    return req.forwarded_for


cdef bytes forwarded_head(Request req, Py_ssize_t body_len):
    """The request head lines after host and authorization, for any worker."""
    cdef list lines = [b"content-type: application/json\r\ncontent-length: ", str(body_len).encode(),
                       b"\r\nx-request-id: ", req.request_id, b"\r\n"]
    if req.traceparent is not None:
        lines.append(b"traceparent: " + req.traceparent + b"\r\n")
    if req.tracestate is not None:
        lines.append(b"tracestate: " + req.tracestate + b"\r\n")
    if req.routing_key is not None:
        lines.append(b"x-smg-routing-key: " + req.routing_key + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


cdef class ProxiedRoute(RequestHandler):

    def __init__(self, ProxySettings settings, int endpoint):
        self.settings = settings
        self.endpoint = endpoint
        self.endpoint_name = ENDPOINT_NAMES[endpoint]

    cdef int launch(self, ClientConnection conn, Request req, Exchange call) except -1:
        """Start the call now if admission control has a slot, else queue it
        (or answer 429)."""
        cdef Admission adm = conn.core.admission
        if adm.try_enter():
            req.admission = adm
            call.start()
        else:
            queue_or_reject(adm, conn, req, call.start_py)
        return 0


cdef class ProxyHandler(ProxiedRoute):

    cdef int handle(self, ClientConnection conn, Request req) except -1:
        cdef object obj = parse_body(conn, req, self.endpoint)
        cdef WorkerGroup group
        cdef str text = None
        if obj is None:
            return 0
        model = (<dict>obj).get("model")
        group = resolve_group(self.settings.router, conn, req, <str>model if model else None, TYPE_REGULAR)
        if group is None:
            return 0
        if group.policy.needs_text:
            text = routing_text(self.endpoint, <dict>obj)
        self.launch(conn, req, ProxyCall(self, conn, req, group, text, routing_key(req)))
        return 0


cdef class ProxyCall(Exchange):
    cdef ProxyHandler handler
    cdef ProxySettings settings
    cdef ClientConnection conn
    cdef Request req
    cdef WorkerGroup group
    cdef str text
    cdef bytes key
    cdef Worker worker
    cdef Worker failed_worker
    cdef UpstreamConnection up
    cdef ConnectWaiter waiter
    cdef ResponseParser relayed         # the parser of the response being relayed
    cdef object retry_timer
    cdef bytes head_start
    cdef bytes head_common
    cdef bytes client_auth
    cdef int attempts
    cdef int status
    cdef bint counted
    cdef bint head_sent
    cdef bint done
    cdef bint chunk_wrap
    cdef str last_error_code
    cdef str last_error_message
    cdef int last_error_status

    def __init__(self, ProxyHandler handler, ClientConnection conn, Request req, WorkerGroup group,
                 str text, bytes key):
        self.handler = handler
        self.settings = handler.settings
        self.conn = conn
        self.req = req
        self.group = group
        self.text = text
        self.key = key
        self.attempts = 0
        self.status = 0
        self.counted = False
        self.head_sent = False
        self.done = False
        self.chunk_wrap = False
        self.last_error_status = 503
        self.last_error_code = "no_available_workers"
        self.last_error_message = "No available workers"

    cdef int start(self) except -1:
        cdef Request req = self.req
        self.head_common = forwarded_head(req, PyBytes_GET_SIZE(req.body))
        self.head_start = b"POST " + req.url + b" HTTP/1.1\r\n"
        self.client_auth = b"authorization: " + req.authorization + b"\r\n" if req.authorization is not None else b""
        self.deadline = req.start + self.settings.request_timeout
        self.conn.exchange = self
        self.attempt()
        return 0

    cdef int attempt(self) except -1:
        cdef double now = monotonic()
        cdef Worker w = self.group.select(self.text, self.key, now, self.failed_worker)
        self.retry_timer = None
        if w is None:
            self.fail_to_client(self.last_error_status, self.last_error_code, self.last_error_message)
            return 0
        self.worker = w
        w.take_request()
        self.counted = True
        self.attempts += 1
        self.waiter = (<UpstreamPool>w.pool).acquire(self)
        return 0

    cdef int release_worker(self, int outcome) except -1:
        """outcome: 1 success, 0 failure, -1 none (the client left)."""
        if self.counted:
            self.counted = False
            self.worker.end_request(outcome)
        return 0

    # --- upstream side ---

    cdef int upstream_ready(self, object c) except -1:
        cdef UpstreamConnection conn = <UpstreamConnection>c
        cdef Worker w = self.worker
        cdef bytes auth
        self.waiter = None
        if self.done or not self.counted:
            (<UpstreamPool>conn.pool).release(conn)
            return 0
        self.up = conn
        conn.attach(self, False)
        auth = w.auth_header if w.auth_header is not None else self.client_auth
        conn.send2(self.head_start + w.host_header + auth + self.head_common, self.req.body)
        return 0

    cdef bint wants_decoded(self):
        # an HTTP/1.0 client cannot take chunked bodies: relay the payload only
        return self.req.http_minor == 0

    cdef int upstream_response(self, object c, ResponseParser p, bytes data, Py_ssize_t off,
                               Py_ssize_t n) except -1:
        cdef int status = p.status
        cdef Request req = self.req
        cdef bytes head
        if self.done:
            return 0
        if retryable_status(status) and self.can_retry():
            (<UpstreamConnection>c).discard()
            self.up = None
            self.release_worker(0)
            self.failed_worker = self.worker
            self.last_error_status = status
            self.last_error_code = "upstream_error"
            self.last_error_message = f"worker answered {status}"
            self.schedule_retry()
            return 0
        self.status = status
        self.release_worker_outcome_only(not failure_status(status))
        head = relay_head(p, self.conn, req, self.worker, req.http_minor == 0, &self.chunk_wrap)
        self.head_sent = True
        self.relayed = p
        if n == 0:
            self.conn.write(head)
        elif self.chunk_wrap:
            self.conn.write(head + wrap_chunk(data, off, n))
        elif off == 0 and n == PyBytes_GET_SIZE(data):
            self.conn.write(head + data)
        else:
            self.conn.write(head + data[off:off + n])
        return 0

    cdef int release_worker_outcome_only(self, bint success) except -1:
        # the circuit breaker learns the outcome at the head; the in-flight
        # count is released when the body ends
        self.worker.record_outcome(success, monotonic())
        return 0

    cdef int upstream_body(self, object c, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        if self.done:
            return 0
        if self.chunk_wrap:
            self.conn.write(wrap_chunk(data, off, n))
        elif off == 0 and n == PyBytes_GET_SIZE(data):
            self.conn.write(data)
        else:
            self.conn.write(data[off:off + n])
        return 0

    cdef int upstream_done(self, object c) except -1:
        if self.done:
            return 0
        self.up = None
        if self.chunk_wrap:
            self.conn.write(b"0\r\n\r\n")
        self.complete(None)
        return 0

    cdef int upstream_failed(self, object c, object exc, int stage) except -1:
        self.up = None
        self.waiter = None
        if self.done:
            return 0
        if self.head_sent:
            # mid-stream: an event stream ends with an error event; any other
            # body ends with the connection, so the client sees it truncated
            # instead of waiting forever
            _log.warning("worker %s dropped a response mid-stream: %s", self.worker.url, exc)
            self.release_worker(-1)
            self.req.keep_alive = False
            end_stream_with_error(self.conn, self.req, self.relayed, self.chunk_wrap, 502, "upstream_error",
                                  f"Worker {self.worker.url} failed mid-stream: {exc}")
            self.complete("stream_error")
            return 0
        self.release_worker(0)
        self.failed_worker = self.worker
        self.last_error_status = 502
        if stage == FAIL_CONNECT:
            self.last_error_code = "worker_unreachable"
            self.last_error_message = f"Could not connect to worker {self.worker.url}: {exc}"
        else:
            self.last_error_code = "upstream_error"
            self.last_error_message = f"Worker {self.worker.url} failed before responding: {exc}"
        if self.can_retry():
            self.schedule_retry()
        else:
            self.fail_to_client(self.last_error_status, self.last_error_code, self.last_error_message)
        return 0

    cdef int upstream_stale(self, object c) except -1:
        self.up = None
        if self.done:
            return 0
        if self.can_retry():
            # the keep-alive race: the worker closed the connection as we
            # reused it. Send again at once, to the same worker, as one more
            # attempt: every send counts against the retry budget
            self.attempts += 1
            self.settings.count_retry(self.worker.worker_type, self.handler.endpoint_name)
            self.waiter = (<UpstreamPool>self.worker.pool).acquire(self)
            return 0
        return self.upstream_failed(c, UpstreamClosed("worker closed the connection before responding"),
                                    FAIL_BEFORE_HEAD)

    # --- retries ---

    cdef bint can_retry(self):
        return (not self.head_sent and self.attempts < self.settings.max_attempts
                and not self.conn.closed and monotonic() < self.deadline)

    cdef int schedule_retry(self) except -1:
        cdef double delay = self.settings.backoff(self.attempts - 1)
        self.settings.count_retry(self.worker.worker_type, self.handler.endpoint_name)
        self.retry_timer = self.settings.loop.call_later(delay, self.retry_now)
        return 0

    def retry_now(self):
        if not self.done:
            self.attempt()

    # --- ending ---

    cdef int fail_to_client(self, int status, str code, str message) except -1:
        if self.attempts > 1 or code == "upstream_error":
            self.settings.count_exhausted(self.group.worker_type, self.handler.endpoint_name)
        self.done = True
        self.release_worker(-1)
        self.conn.respond_error(self.req, status, code, message)
        return 0

    cdef int complete(self, str error_code) except -1:
        self.done = True
        self.release_worker(-1)
        self.conn.finish(self.req, self.status, error_code)
        return 0

    cdef int stop_upstream(self) except -1:
        if self.up is not None:
            self.up.abort()
            self.up = None
        if self.waiter is not None:
            self.waiter.cancelled = True
            self.waiter = None
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        return 0

    # --- client side ---

    cdef int client_lost(self) except -1:
        if self.done:
            return 0
        self.done = True
        self.stop_upstream()
        self.release_worker(-1)
        return 0

    cdef int client_pause(self) except -1:
        if self.up is not None:
            self.up.pause_reading()
        return 0

    cdef int client_resume(self) except -1:
        if self.up is not None:
            self.up.resume_reading()
        return 0

    cdef int expired(self, double now) except -1:
        if self.done:
            return 0
        self.stop_upstream()
        if self.counted:
            self.release_worker(0)
        if self.head_sent:
            self.req.keep_alive = False
            end_stream_with_error(self.conn, self.req, self.relayed, self.chunk_wrap, 504, "request_timeout",
                                  f"No complete response within {self.settings.request_timeout:g} s")
            self.complete("stream_error")
        else:
            self.fail_to_client(504, "request_timeout",
                                f"No response from a worker within {self.settings.request_timeout:g} s")
        return 0
