from smg._fast.exchange cimport Exchange
from smg._fast.flow cimport ResponseSource
from smg._fast.http1 cimport ResponseParser
from smg._fast.cycle cimport RequestCycle
from smg._fast.request cimport Request
from smg._fast.upstream cimport UpstreamConnection, ConnectWaiter
from smg._fast.routes cimport Histogram
from smg._fast.worker cimport Worker
from smg._fast.policies cimport Router
from smg._fast.admission cimport Admission


cdef class ClientCall
cdef class Leg

cdef enum:
    # how a leg ends when its call no longer needs it (Leg.end)
    LEG_FINISH = 0        # a leg under way (connecting, sending, answering) may finish, until the deadline
    LEG_STOP = 1          # stop now
    LEG_TIMED_OUT = 2     # stop now; a worker that has not answered counts as failed


cdef bint retryable_status(int status) noexcept
cdef bint failure_status(int status) noexcept
cdef bytes relay_head(ResponseParser p, RequestCycle cycle, Worker w, bint decoded, bint* wrap,
                      long long content_length=*)
cdef bytes wrap_chunk(bytes data, Py_ssize_t off, Py_ssize_t n)
cdef bint end_stream_with_error(RequestCycle cycle, ResponseParser p, bint wrapped, int status, str code,
                                str message)
cdef bytes forwarded_head(Request req, Py_ssize_t body_len)
cpdef bytes with_dp_rank(bytes body, int rank)
cdef Leg new_leg(ClientCall call, Worker worker, bytes head, object body, bint decoded)


cdef class RouterSeries:
    """The router metrics of one (backend, model, endpoint): the requests
    routed, by whether they stream, and the calls' durations."""
    cdef public long long plain
    cdef public long long streamed
    cdef public Histogram durations


cdef class CallSettings:
    """What all proxied calls share: the router, admission control, retry
    and timeout settings, and the retry counters (read by smg.metrics)."""
    cdef public Router router
    cdef public Admission admission
    cdef public object loop
    cdef public int max_attempts
    cdef public double backoff_initial
    cdef public double backoff_max
    cdef public double backoff_multiplier
    cdef public double backoff_jitter
    cdef public double request_timeout
    cdef public double sse_keepalive     # seconds of silence before a keep-alive comment (0: none)
    cdef public dict model_aliases       # --model-alias: client-facing name -> served model
    cdef public object prefill_queue     # smg._fast.pd.PrefillQueue (None: no prefill limit)
    cdef public object tracer            # smg.tracing.Tracer (None: tracing off, nothing is spent)
    cdef public dict retries
    cdef public dict retries_exhausted
    # smg_router_* (the reference's family), read by smg.metrics
    cdef public dict series              # (backend, model, endpoint) -> RouterSeries
    cdef public dict errors              # (backend, model, endpoint, error_type) -> count
    cdef dict upstream                   # (status, error_code) -> count, with an error code
    cdef long long answered[600]         # status -> count, answers without one (see upstream_counts)

    cdef double backoff(self, int retry_index)
    cdef RouterSeries series_of(self, str backend, str model, str endpoint)
    cdef int count_error(self, str backend, str model, str endpoint, str error_type) except -1
    cdef int count_upstream(self, int status, str error_code) except -1
    cdef int count_retry(self, int worker_type, str endpoint) except -1
    cdef int count_exhausted(self, int worker_type, str endpoint) except -1


cdef class Leg(Exchange):
    """One worker's part in a call: a connection from the worker's pool, the
    request sent on it, the response reported to the call. The worker's
    in-flight count is held from the send until the leg ends."""
    cdef ClientCall call
    cdef public Worker worker
    cdef UpstreamConnection up
    cdef ConnectWaiter waiter
    cdef bytes head
    cdef object body
    cdef bint decoded                    # the call wants the payload without chunk framing
    cdef bint counted
    cdef bint awaiting_answer            # counted in its worker's unanswered
    cdef bint finished
    cdef bint collecting                 # keep the body (in parts) instead of reporting it
    cdef int status
    cdef long long prefill_chars         # what it adds to its worker's prefill_queue_chars until answered
    cdef list parts
    cdef double finish_by                # LEG_FINISH: stopped if still running then
    cdef bint streamed                   # the body streams from the client (RequestCycle.streaming)
    cdef bint body_chunked               # ... in chunks
    cdef bint body_sent                  # ... and has been sent in full
    cdef bint write_blocked              # the worker's socket is full

    cdef int begin(self) except -1
    cdef int stream_body(self, bint chunked) except -1
    cdef int pump(self) except -1
    cdef int release(self, int outcome) except -1
    cdef int answering(self) except -1
    cdef int unqueue_prefill(self) except -1
    cdef int end(self, int how) except -1
    cdef int stop(self, int outcome) except -1
    cdef int pause_reading(self) except -1
    cdef int resume_reading(self) except -1


cdef class ClientCall(ResponseSource):
    """A client's request proxied to workers, until its response ends: the
    attempts and their retry budget, backoff and deadline, stopping every
    leg however the call ends, and the writes that relay a response."""
    cdef CallSettings settings
    cdef str endpoint_name
    cdef RequestCycle cycle
    cdef Request req
    cdef int worker_type                 # counted in the retry metrics
    cdef str backend                     # "regular" or "pd" (router metrics)
    cdef str model_label                 # the served model, "unknown" (none named) or "other"
    cdef RouterSeries series             # the router metrics it counts in (see ProxiedRoute.count_routed)
    cdef int attempts                    # sends so far, all legs together
    cdef bint done
    cdef bint head_sent
    cdef bint wrap                       # the gateway frames the client's chunks
    cdef int status
    cdef ResponseParser relayed          # the response head relayed to the client
    cdef Leg relaying                    # the leg whose body goes to the client
    cdef bint held_back                  # the relaying leg is not read for the call's own reason
    cdef object retry_timer
    cdef bint sse                        # relaying an event stream to an HTTP/1.1 client
    cdef bint at_event_end               # what was relayed last ends an SSE event
    cdef double last_write               # when the client was last written to
    cdef object trace                    # --enable-trace: the span under way (Tracer.begin)
    cdef double head_at                  # when the response head went to the client (time to first byte)
    cdef Worker last_worker              # the worker of the last leg made
    cdef int error_status                # what the client gets if no attempt succeeds
    cdef str error_code
    cdef str error_message

    cdef int setup(self, CallSettings settings, str endpoint_name, RequestCycle cycle, int worker_type,
                   str backend, str model_label) except -1
    cdef int record_end(self, str error_code, int status) except -1
    cdef int end_trace(self, int status, str error_code) except -1
    cdef int start(self) except -1
    cdef int attempt(self) except -1
    cdef int end_legs(self, int how) except -1
    cdef int drop_buffers(self) except -1
    cdef int end_call(self, int how) except -1

    cdef int leg_head(self, Leg leg, ResponseParser p, bytes data, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int leg_body(self, Leg leg, bytes data, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int leg_done(self, Leg leg) except -1
    cdef int leg_failed(self, Leg leg, object exc, int stage) except -1
    cdef int resend(self, Leg leg, object conn) except -1

    cdef bint can_retry(self)
    cdef int retry(self, Worker failed) except -1
    cdef int note_error(self, int status, str code, str message) except -1

    cdef bytes response_head(self, ResponseParser p, Worker w, bint decoded, long long content_length=*)
    cdef int relay(self, bytes head, bytes data, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int end_relay(self) except -1
    cdef int fail_to_client(self, int status, str code, str message, bytes extra_headers=*) except -1
    cdef int break_stream(self, int status, str code, str message) except -1
    cdef int complete(self, str error_code) except -1
