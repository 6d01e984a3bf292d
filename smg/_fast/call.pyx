# cython: language_level=3
"""What every proxied call shares, regular or prefill/decode: a
ClientCall is the source of its request's response. It sends Legs (one
per worker it talks to), retries while nothing has reached the client
(every send counts against --retry-max-retries, with backoff), enforces
--request-timeout-secs, relays the response head and body with the
framing the client needs, ends a broken event stream with an error event,
and stops every leg however it ends. smg._fast.proxy and smg._fast.pd
decide what the legs are and what their answers mean."""

from cpython.bytes cimport PyBytes_GET_SIZE, PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcpy
from smg._fast.clock cimport monotonic
from smg._fast.exchange cimport FAIL_BEFORE_HEAD, FAIL_CONNECT
from smg._fast.upstream cimport UpstreamPool
from smg._fast.policies cimport rand64
from smg._fast.routes cimport Route, error_body, anthropic_error_body, Histogram

import orjson

from smg._fast.upstream import UpstreamClosed
from smg._fast.worker import TYPE_NAMES

_TYPE_NAMES = TYPE_NAMES
cdef dict _STATUS_LINES = {}
# an SSE comment, as one chunk
cdef bytes _SSE_KEEPALIVE = b"e\r\n: keep-alive\n\n\r\n"


# the status line made last, for the next answer (most are the same)
cdef int _last_status = 0
cdef bytes _last_reason = None
cdef bytes _last_status_line = None


cdef bytes upstream_status_line(ResponseParser p):
    global _last_status, _last_reason, _last_status_line
    if p.status == _last_status and p.reason == _last_reason:
        return _last_status_line
    key = (p.status, p.reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (p.status, p.reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    _last_status = p.status
    _last_reason = p.reason
    _last_status_line = <bytes>line
    return <bytes>line


cdef bytes content_length_line(long long n):
    """b"content-length: N\r\n" (n >= 0), without the cost of bytes formatting."""
    cdef char line[48]
    cdef char digits[24]
    cdef int k = 0, i
    memcpy(line, b"content-length: ", 16)
    while True:
        digits[k] = <char>(48 + n % 10)
        k += 1
        n //= 10
        if n == 0:
            break
    for i in range(k):
        line[16 + i] = digits[k - 1 - i]
    line[16 + k] = 13
    line[17 + k] = 10
    return PyBytes_FromStringAndSize(line, 18 + k)


cdef bint retryable_status(int status) noexcept:
    return status == 408 or status == 429 or status == 500 or status == 502 or status == 503 or status == 504


cdef bint failure_status(int status) noexcept:
    """Counts against the worker's circuit breaker."""
    return status == 408 or status == 429 or status >= 500


cdef bytes relay_head(ResponseParser p, RequestCycle cycle, Worker w, bint decoded, bint* wrap,
                      long long content_length=-1):
    """The head of the response relayed to the client. The upstream's framing
    is kept when the body passes through unchanged (chunks included);
    `decoded` bodies (payload only) and bodies that end with the connection
    are re-chunked for HTTP/1.1 clients (*wrap set), and HTTP/1.0 clients
    get the body unframed with the connection closed after it.
    content_length >= 0 announces a body the caller rewrote, -2 a rewritten
    body of unknown length (the upstream's Content-Length no longer holds)."""
    cdef Request req = cycle.req
    cdef list parts = [upstream_status_line(p), p.forward_headers]
    wrap[0] = False
    if content_length == -1 and p.content_length >= 0 and not p.chunked:
        content_length = p.content_length
    if content_length >= 0:
        parts.append(content_length_line(content_length))
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
    if req.cors:
        parts.append(req.cors)
    parts.append(cycle.date_header())
    if cycle.closes():
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


cdef bytes wrap_chunk(bytes data, Py_ssize_t off, Py_ssize_t n):
    return b"%x\r\n" % n + data[off:off + n] + b"\r\n"


cdef bint end_stream_with_error(RequestCycle cycle, ResponseParser p, bint wrapped, int status, str code,
                                str message):
    """End an event stream that broke off (the worker failed, the request
    timed out) the way clients understand: an error event (OpenAI's
    `data: {"error": ...}` then `data: [DONE]`, or the Anthropic API's
    `event: error`), then the end of the chunked body. `wrapped`: the gateway frames the
    chunks itself. False when the stream cannot take them: not SSE, not
    chunked to the client (HTTP/1.0 gets the body unframed), or cut inside
    one of the worker's chunks."""
    if cycle.req.http_minor == 0 or p is None or p.content_type is None \
            or not p.content_type.startswith(b"text/event-stream"):
        return False
    if not wrapped and not (p.chunked and p.between_chunks()):
        return False
    if (<Route>cycle.req.route).anthropic:
        event = b"event: error\ndata: " + anthropic_error_body(status, message, cycle.req.request_id) + b"\n\n"
    else:
        event = b"data: " + error_body(status, code, message) + b"\n\ndata: [DONE]\n\n"
    cycle.write(b"%x\r\n" % len(event) + event + b"\r\n0\r\n\r\n")
    return True


cpdef bytes with_dp_rank(bytes body, int rank):
    """The request body (a JSON object) naming the engine's data-parallel
    rank to run it on (--dp-aware): the key spliced in after the opening
    brace, or, when the client named a rank itself, the body re-encoded
    with the gateway's."""
    cdef Py_ssize_t i = 0, n = PyBytes_GET_SIZE(body)
    if b'"data_parallel_rank"' in body:
        doc = orjson.loads(body)
        doc["data_parallel_rank"] = rank
        return orjson.dumps(doc)
    while i < n and body[i] in b" \t\r\n":
        i += 1
    j = i + 1
    while j < n and body[j] in b" \t\r\n":
        j += 1
    key = b'"data_parallel_rank":%d' % rank
    if j < n and body[j] == 125:  # "}": an empty object
        return body[:i + 1] + key + body[j:]
    return body[:i + 1] + key + b"," + body[i + 1:]


cdef bytes forwarded_head(Request req, Py_ssize_t body_len):
    """The request head lines after host and authorization, for any worker
    (body_len < 0: a chunked body)."""
    cdef list lines = [b"content-type: application/json\r\n",
                       content_length_line(body_len) if body_len >= 0 else b"transfer-encoding: chunked\r\n",
                       b"x-request-id: ", req.request_id, b"\r\n"]
    if req.traceparent is not None:
        lines.append(b"traceparent: " + req.traceparent + b"\r\n")
    if req.tracestate is not None:
        lines.append(b"tracestate: " + req.tracestate + b"\r\n")
    if req.routing_key is not None:
        lines.append(b"x-smg-routing-key: " + req.routing_key + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


cdef class RouterSeries:
    pass


cdef class CallSettings:

    def __init__(self, Router router, loop, Admission admission=None, int max_attempts=5,
                 double backoff_initial=0.05, double backoff_max=30.0, double backoff_multiplier=1.5,
                 double backoff_jitter=0.2, double request_timeout=1800.0, double sse_keepalive=15.0):
        self.router = router
        self.loop = loop
        self.admission = admission if admission is not None else Admission()
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.backoff_multiplier = backoff_multiplier
        self.backoff_jitter = backoff_jitter
        self.request_timeout = request_timeout
        self.sse_keepalive = sse_keepalive
        self.model_aliases = {}
        self.prefill_queue = None
        self.tracer = None
        self.retries = {}
        self.retries_exhausted = {}
        self.series = {}
        self.errors = {}
        self.upstream = {}

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

    cdef RouterSeries series_of(self, str backend, str model, str endpoint):
        key = (backend, model, endpoint)
        s = self.series.get(key)
        if s is None:
            s = RouterSeries.__new__(RouterSeries)
            (<RouterSeries>s).durations = Histogram()
            self.series[key] = s
        return <RouterSeries>s

    def routed_counts(self):
        """smg_router_requests_total: [backend, model, endpoint, streaming, count]."""
        cdef RouterSeries s
        out = []
        for key, s in self.series.items():
            if s.plain:
                out.append([*key, "false", s.plain])
            if s.streamed:
                out.append([*key, "true", s.streamed])
        return out

    def upstream_counts(self):
        """{(status, error_code): count} of the workers' answers and failures."""
        counts = dict(self.upstream)
        for status in range(600):
            if self.answered[status]:
                counts[(status, "")] = counts.get((status, ""), 0) + self.answered[status]
        return counts

    cdef int count_error(self, str backend, str model, str endpoint, str error_type) except -1:
        key = (backend, model, endpoint, error_type)
        self.errors[key] = self.errors.get(key, 0) + 1
        return 0

    cdef int count_upstream(self, int status, str error_code) except -1:
        if not error_code and 0 <= status < 600:
            self.answered[status] += 1  # most answers: an array slot, not a dict keyed by a fresh tuple
            return 0
        key = (status, error_code)
        self.upstream[key] = self.upstream.get(key, 0) + 1
        return 0


cdef str error_type_of(str code):
    """smg_router_request_errors_total's error_type for an error code."""
    if code == "request_timeout":
        return "timeout"
    if code == "no_available_workers":
        return "no_workers"
    return "backend_error"


# legs left to finish an answer their call no longer needs (Leg.end)
cdef list _finishing = []


def stop_overdue_legs(double now):
    """Stop the legs left to finish whose deadline has passed (the data
    plane's periodic tick); forget the ones that have finished."""
    global _finishing
    cdef Leg leg
    cdef list keep = []
    if not _finishing:
        return
    for leg in _finishing:
        if leg.finished:
            continue
        if now >= leg.finish_by:
            leg.stop(-1)
        else:
            keep.append(leg)
    _finishing = keep


cdef Leg new_leg(ClientCall call, Worker worker, bytes head, object body, bint decoded):
    """A leg of `call` to `worker`, sending head + body; the worker counts it
    in flight from now."""
    cdef Leg leg = Leg.__new__(Leg)
    leg.call = call
    leg.worker = worker
    leg.head = head
    leg.body = body
    leg.decoded = decoded
    leg.counted = True
    leg.awaiting_answer = True
    leg.finished = False
    leg.collecting = False
    leg.status = 0
    leg.parts = []
    leg.finish_by = 0
    leg.streamed = False
    call.last_worker = worker
    worker.take_request()
    leg.prefill_chars = worker.next_prefill_chars
    worker.next_prefill_chars = 0
    worker.prefill_queue_chars += leg.prefill_chars
    return leg


cdef class Leg(Exchange):

    cdef int begin(self) except -1:
        # a streamed body cannot be sent again: no reused connection the
        # worker may be closing under it
        self.waiter = (<UpstreamPool>self.worker.pool).acquire(self, self.streamed)
        return 0

    cdef int stream_body(self, bint chunked) except -1:
        """Send the request's body as the client sends it (RequestCycle.streaming),
        re-framed in chunks when the client chunked it."""
        self.streamed = True
        self.body_chunked = chunked
        return 0

    cdef int pump(self) except -1:
        """A streamed body: send what the client has sent so far, unless the
        worker's socket is full (then the client is not read either)."""
        cdef RequestCycle cycle
        cdef UpstreamConnection up = self.up
        cdef bytes part
        if up is None or up.closed or self.finished or self.write_blocked or self.body_sent or self.call is None:
            return 0
        cycle = self.call.cycle
        for part in cycle.take_body_parts():
            if self.body_chunked:
                up.send(b"%x\r\n" % PyBytes_GET_SIZE(part) + part + b"\r\n")
            else:
                up.send(part)
        if cycle.body_ended:
            if self.body_chunked:
                up.send(b"0\r\n\r\n")
            self.body_sent = True
            up.sending = False
        return 0

    cdef int upstream_writable(self, bint writable) except -1:
        self.write_blocked = not writable
        if writable and self.streamed:
            self.pump()
        return 0

    cdef int release(self, int outcome) except -1:
        """outcome: 1 success, 0 failure (told to the circuit breaker), -1 none."""
        self.answering()
        if self.counted:
            self.counted = False
            self.worker.end_request(outcome)
        return 0

    cdef int answering(self) except -1:
        """The worker has begun answering: on the first body byte (a streamed
        answer starts with the first token), or at the end."""
        if self.awaiting_answer:
            self.awaiting_answer = False
            self.worker.answered()
        self.unqueue_prefill()
        return 0

    cdef int unqueue_prefill(self) except -1:
        """This leg's prompt is no longer counted in its worker's prefill
        queue: it has begun answering, or its prefill's end cannot be seen
        (an answer that shows nothing before it is complete)."""
        if self.prefill_chars:
            self.worker.prefill_queue_chars -= self.prefill_chars
            self.prefill_chars = 0
        return 0

    cdef int end(self, int how) except -1:
        """The call no longer needs this leg (see LEG_FINISH and the others)."""
        if self.finished:
            return 0
        if how == LEG_FINISH and (self.up is not None or self.waiter is not None):
            # e.g. prefill still sending when decode has ended: dropping the
            # rest of its answer costs less than a new connection; a leg
            # still waiting for its connection is sent when it has one (the
            # worker gets every request it was chosen for)
            self.collecting = False
            self.parts = []
            if self.finish_by == 0:
                self.finish_by = self.call.deadline
                _finishing.append(self)
            return 0
        return self.stop(0 if how == LEG_TIMED_OUT and self.status == 0 else -1)

    cdef int stop(self, int outcome) except -1:
        """Abandon this leg now; `outcome` goes to the worker (see release).
        A finished leg lets go of its call: the call keeps its legs, and a
        cycle between them would wait for the garbage collector."""
        self.finished = True
        self.call = None
        self.head = None
        self.body = None
        if self.up is not None:
            self.up.discard()
            self.up = None
        if self.waiter is not None:
            self.waiter.cancelled = True
            self.waiter = None
        self.release(outcome)
        return 0

    cdef int pause_reading(self) except -1:
        if self.up is not None:
            self.up.pause_reading()
        return 0

    cdef int resume_reading(self) except -1:
        if self.up is not None:
            self.up.resume_reading()
        return 0

    cdef bint wants_decoded(self):
        return self.decoded

    cdef int upstream_ready(self, object c) except -1:
        cdef UpstreamConnection conn = <UpstreamConnection>c
        cdef ClientCall call = self.call
        self.waiter = None
        if self.finished:
            (<UpstreamPool>conn.pool).release(conn)
            return 0
        self.up = conn
        conn.attach(self, False)
        if self.streamed:
            conn.sending = True
            conn.send(self.head)
            self.pump()
        else:
            conn.send2(self.head, self.body)
        if call.relaying is self and (call.held_back or call.cycle.flow.write_paused):
            conn.pause_reading()
        return 0

    cdef int upstream_response(self, object conn, ResponseParser p, bytes data, Py_ssize_t off,
                               Py_ssize_t n) except -1:
        cdef ClientCall call = self.call
        self.status = p.status
        if not self.finished:
            call.settings.count_upstream(p.status, "")
            call.leg_head(self, p, data, off, n)
        return 0

    cdef int upstream_body(self, object conn, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        cdef ClientCall call = self.call
        if self.awaiting_answer:
            self.answering()
        if self.collecting:
            self.parts.append(data[off:off + n])
        elif not self.finished:
            call.leg_body(self, data, off, n)
        return 0

    cdef int upstream_done(self, object conn) except -1:
        cdef ClientCall call = self.call
        self.up = None
        if self.finished:
            return 0
        self.stop(-1)
        call.leg_done(self)
        return 0

    cdef int upstream_failed(self, object c, object exc, int stage) except -1:
        cdef ClientCall call = self.call
        self.up = None
        self.waiter = None
        if self.finished:
            return 0
        self.stop(0)
        if self.status == 0:
            call.settings.count_upstream(502, "worker_unreachable" if stage == FAIL_CONNECT else "upstream_error")
        self.worker.note_error(("connect: " if stage == FAIL_CONNECT else "request: ") + (str(exc) or type(exc).__name__))
        call.leg_failed(self, exc, stage)
        return 0

    cdef int upstream_stale(self, object c) except -1:
        cdef ClientCall call = self.call
        self.up = None
        if self.finished:
            return 0
        return call.resend(self, c)


cdef class ClientCall(ResponseSource):

    cdef int setup(self, CallSettings settings, str endpoint_name, RequestCycle cycle, int worker_type,
                   str backend, str model_label) except -1:
        """What a subclass's constructor sets first (calls are made per
        request: no Python-level __init__ chain)."""
        self.settings = settings
        self.backend = backend
        self.model_label = model_label
        self.endpoint_name = endpoint_name
        self.cycle = cycle
        self.req = cycle.req
        self.worker_type = worker_type
        self.attempts = 0
        self.done = False
        self.head_sent = False
        self.wrap = False
        self.status = 0
        self.held_back = False
        # what the client gets when no worker can take the request (the reference's words)
        self.error_status = 503
        self.error_code = "no_available_workers"
        self.error_message = "All workers are unavailable (circuit breaker open or unhealthy)"
        if settings.tracer is not None:
            # before any leg's head is made: the worker gets this span as its parent
            self.trace = settings.tracer.begin(self.req)
        return 0

    def start_py(self):
        self.start()

    cdef int start(self) except -1:
        """Begin (once admitted): the deadline runs from the request's arrival."""
        self.deadline = self.req.start + self.settings.request_timeout
        self.cycle.hand_off(self)
        self.attempt()
        return 0

    cdef int attempt(self) except -1:
        """Pick workers and send the legs (or fail_to_client)."""
        return 0

    cdef int end_legs(self, int how) except -1:
        """Leg.end(how) for every leg of the current attempt."""
        return 0

    cdef int drop_buffers(self) except -1:
        """The call is over: what it holds of the workers' answers goes now,
        not when the garbage collector finds the call and its legs."""
        return 0

    # --- what the legs report ---

    cdef int leg_head(self, Leg leg, ResponseParser p, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        return 0

    cdef int leg_body(self, Leg leg, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        return 0

    cdef int leg_done(self, Leg leg) except -1:
        return 0

    cdef int leg_failed(self, Leg leg, object exc, int stage) except -1:
        return 0

    cdef int resend(self, Leg leg, object conn) except -1:
        """The keep-alive race: the worker closed a reused connection as the
        leg was sent. Send again at once, to the same worker, as one more
        attempt: every send counts against the retry budget."""
        if self.can_retry():
            self.attempts += 1
            self.settings.count_retry(leg.worker.worker_type, self.endpoint_name)
            leg.waiter = (<UpstreamPool>leg.worker.pool).acquire(leg)
            return 0
        return leg.upstream_failed(conn, UpstreamClosed("worker closed the connection before responding"),
                                   FAIL_BEFORE_HEAD)

    # --- retries ---

    cdef bint can_retry(self):
        # a streamed body has gone to the worker as it came: it cannot be sent again
        return (not self.head_sent and not self.done and self.attempts < self.settings.max_attempts
                and not self.cycle.conn.closed and monotonic() < self.deadline and not self.cycle.streaming)

    cdef int note_error(self, int status, str code, str message) except -1:
        """What the client gets if no further attempt succeeds."""
        self.error_status = status
        self.error_code = code
        self.error_message = message
        return 0

    cdef int retry(self, Worker failed) except -1:
        """Attempt again after the backoff (the caller stopped the legs)."""
        self.settings.count_retry(failed.worker_type, self.endpoint_name)
        self.retry_timer = self.settings.loop.call_later(self.settings.backoff(self.attempts - 1), self.retry_now)
        return 0

    def retry_now(self):
        self.retry_timer = None
        if not self.done:
            self.attempt()

    # --- relaying ---

    cdef bytes response_head(self, ResponseParser p, Worker w, bint decoded, long long content_length=-1):
        """The head relayed to the client (see relay_head); from here on the
        call cannot be retried."""
        self.status = p.status
        self.relayed = p
        self.head_sent = True
        self.head_at = monotonic()
        self.sse = (self.req.http_minor == 1 and p.content_type is not None
                    and p.content_type.startswith(b"text/event-stream"))
        self.at_event_end = True
        self.last_write = monotonic()
        return relay_head(p, self.cycle, w, decoded, &self.wrap, content_length)

    cdef int relay(self, bytes head, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        """Write `head` (None: none), then data[off:off + n] framed as the
        client's response is."""
        cdef bytes piece
        cdef const char* end
        if n == 0:
            if head is not None:
                self.cycle.write(head)
            return 0
        if self.sse:
            # an event ends with a blank line; relayed chunks end with CRLF too
            end = PyBytes_AS_STRING(data) + off + n
            if self.wrap:
                self.at_event_end = n >= 2 and end[-1] == 10 and end[-2] == 10
            else:
                self.at_event_end = n >= 4 and end[-1] == 10 and end[-2] == 13 and end[-3] == 10 and end[-4] == 10
            self.last_write = monotonic()
        if self.wrap:
            piece = wrap_chunk(data, off, n)
        elif off == 0 and n == PyBytes_GET_SIZE(data):
            piece = data
        else:
            piece = data[off:off + n]
        self.cycle.write(head + piece if head is not None else piece)
        return 0

    cdef int end_relay(self) except -1:
        if self.wrap:
            self.cycle.write(b"0\r\n\r\n")
        self.complete(None)
        return 0

    # --- ending ---

    cdef int end_call(self, int how) except -1:
        self.done = True
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self.end_legs(how)
        self.drop_buffers()
        return 0

    cdef int record_end(self, str error_code, int status) except -1:
        """The router metrics (and with --enable-trace, the span) of a call
        that ends (error_code None: success)."""
        if self.trace is not None:
            self.end_trace(status, error_code)
        if self.series is None:
            self.series = self.settings.series_of(self.backend, self.model_label, self.endpoint_name)
        self.series.durations.observe(monotonic() - self.req.start)
        if error_code is not None:
            self.settings.count_error(self.backend, self.model_label, self.endpoint_name, error_type_of(error_code))
        return 0

    cdef int end_trace(self, int status, str error_code) except -1:
        """--enable-trace: hand the call's span to the tracer (exported in batches, off the event loop)."""
        trace = self.trace
        self.trace = None
        self.settings.tracer.end(trace, self.req, self.model_label,
                                 self.last_worker.url if self.last_worker is not None else None,
                                 self.attempts, status, error_code,
                                 self.head_at - self.req.start if self.head_at > 0 else -1.0)
        return 0

    cdef int fail_to_client(self, int status, str code, str message, bytes extra_headers=b"") except -1:
        """Answer with an error (nothing has reached the client yet). No
        worker to take it is temporary: the client may retry in a second."""
        if self.done:
            return 0
        if status == 503 and not extra_headers:
            extra_headers = b"retry-after: 1\r\n"
        if self.attempts > 1 or code == "upstream_error":
            self.settings.count_exhausted(self.worker_type, self.endpoint_name)
        self.end_call(LEG_STOP)
        self.record_end(code, status)
        self.cycle.respond_error(status, code, message, None, None, extra_headers)
        return 0

    cdef int break_stream(self, int status, str code, str message) except -1:
        """The response broke off after its head was relayed: an event stream
        ends with an error event; any other body ends with the connection,
        so the client sees it truncated instead of waiting forever."""
        if self.done:
            return 0
        self.req.keep_alive = False
        self.end_call(LEG_STOP)
        self.record_end(code, status)
        end_stream_with_error(self.cycle, self.relayed, self.wrap, status, code, message)
        self.cycle.finish(self.status, "stream_error")
        return 0

    cdef int complete(self, str error_code) except -1:
        """The client's response is complete."""
        if self.done:
            return 0
        self.end_call(LEG_FINISH)
        self.record_end(None if self.status < 500 else "upstream_status", self.status)
        self.cycle.finish(self.status, error_code)
        return 0

    # --- the client's side ---

    cdef int client_lost(self) except -1:
        if not self.done:
            self.end_call(LEG_STOP)
            if self.trace is not None:
                self.end_trace(499, "client_closed_request")
        return 0

    cdef int client_pause(self) except -1:
        if self.relaying is not None:
            self.relaying.pause_reading()
        return 0

    cdef int client_resume(self) except -1:
        if self.relaying is not None and not self.held_back:
            self.relaying.resume_reading()
        return 0

    cdef int body_available(self) except -1:
        if self.relaying is not None:
            self.relaying.pump()
        return 0

    cdef int body_failed(self, int status, str code, str message) except -1:
        """The streamed request body broke off (stalled, or over the size
        limit): the worker will not get all of it."""
        if self.head_sent:
            self.break_stream(status, code, message)
        else:
            self.fail_to_client(status, code, message)
        return 0

    cdef int tick(self, double now) except -1:
        """--sse-keepalive-secs: an event stream silent that long gets an SSE
        comment, between two events, so that proxies with idle timeouts do
        not cut it while the worker is busy."""
        if (not self.sse or self.done or self.settings.sse_keepalive <= 0
                or now - self.last_write < self.settings.sse_keepalive or not self.at_event_end):
            return 0
        if not self.wrap and not self.relayed.between_chunks():
            return 0
        self.cycle.write(_SSE_KEEPALIVE)
        self.last_write = now
        return 0

    cdef int expired(self, double now) except -1:
        if self.done:
            return 0
        self.end_legs(LEG_TIMED_OUT)
        if self.head_sent:
            self.break_stream(504, "request_timeout",
                              f"No complete response within {self.settings.request_timeout:g} s")
        else:
            self.fail_to_client(504, "request_timeout",
                                f"No response from a worker within {self.settings.request_timeout:g} s")
        return 0
