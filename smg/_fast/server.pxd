from smg._fast.exchange cimport Exchange
from smg._fast.admission cimport Admission

cdef enum:
    AUTH_NONE = 0
    AUTH_DATA = 1      # serving routes: --api-key
    AUTH_ADMIN = 2     # admin routes: --admin-api-key, else --api-key

cdef enum:
    N_BUCKETS = 30


cdef class Histogram:
    cdef long long counts[N_BUCKETS]
    cdef public double total
    cdef public long long count
    cdef void observe(self, double value) noexcept


cdef class Request:
    cdef public bytes method
    cdef public bytes url
    cdef public str path
    cdef public bytes query
    cdef public object body              # bytes once complete
    cdef list body_parts
    cdef public long long body_len
    cdef public bint keep_alive
    cdef public int http_minor
    cdef public double start
    cdef public object route             # Route
    cdef public bytes request_id
    cdef public bint id_from_client
    # the request headers the gateway uses, raw values
    cdef public bytes authorization
    cdef public bytes traceparent
    cdef public bytes tracestate
    cdef public bytes routing_key
    cdef public bytes forwarded_for
    cdef public bytes content_type
    cdef public bytes content_length
    cdef public bytes expect
    cdef public bytes connection
    cdef public bint chunked             # Transfer-Encoding present: a body follows
    # decided when the headers are complete: the answer of a request refused
    # by route, method or auth (status, body, content type, headers, code)
    cdef public tuple refusal
    # request-id candidates, in priority order
    cdef bytes id_x_request_id
    cdef bytes id_x_correlation_id
    cdef bytes id_x_trace_id
    cdef bytes id_request_id
    cdef long long header_bytes
    cdef int header_count
    cdef public Admission admission      # holds a slot of it until the response ends

    cdef bytes finish_body(self)


cdef class RequestHandler:
    """A route served in Cython (the proxy); Python routes use plain callables."""
    cdef int handle(self, ClientConnection conn, Request req) except -1


cdef class Route:
    cdef public str path
    cdef public frozenset methods
    cdef public object handler           # Python callable(Request) -> Response | awaitable
    cdef public RequestHandler native
    cdef public int auth
    cdef public bytes id_prefix
    cdef public bytes allow_header
    # metrics, read by smg.metrics at scrape time
    cdef public dict requests            # method -> count
    cdef public dict responses           # (status, error_code) -> count
    cdef public dict durations           # method -> Histogram

    cdef void record(self, bytes method, int status, str error_code, double seconds)


cdef class ServerCore:
    cdef public Admission admission
    cdef public dict routes              # exact path -> Route
    cdef public list prefix_routes       # [(prefix, Route)]
    cdef public Route not_found
    cdef public object loop
    cdef public long long max_payload
    cdef public long long max_header_bytes
    cdef public int max_headers
    cdef public int max_pipeline
    cdef public double header_timeout
    cdef public double idle_timeout
    cdef public bytes api_key            # b"Bearer <key>" or None
    cdef public bytes admin_api_key
    cdef public set connections
    cdef public bytes date_header
    cdef public bint shutting_down
    cdef public long max_connections      # client connections at most (file descriptors); 0: no limit
    cdef public long long shed_total       # idle keep-alive connections closed to stay under it
    cdef double shed_logged_at

    cpdef Route resolve(self, str path)


cdef class ClientConnection:
    cdef ServerCore core
    cdef public object transport
    cdef object parser
    cdef Request parsing                 # request whose bytes are being parsed
    cdef public Request active           # request being answered
    cdef object pending                  # deque of complete requests waiting their turn
    cdef public Exchange exchange        # the proxied exchange of `active`, if any
    cdef public bint closed
    cdef bint reading_paused
    cdef long long pending_bytes         # body bytes of the requests waiting in `pending`
    cdef bint lingering                  # answered and half-closed: dropping input until the client closes
    cdef double linger_until
    cdef public bint write_paused
    cdef bint close_after
    cdef int error_status                # set by a parser callback that refuses the request
    cdef str error_code
    cdef str error_message
    cdef double last_activity
    cdef double head_started
    cdef public object peer

    cdef int classify(self, Request req) except -1
    cdef int safe_dispatch(self, Request req) except -1
    cdef int dispatch(self, Request req) except -1
    cdef int linger(self) except -1
    cdef bint may_read_more(self)
    cdef int write(self, bytes data) except -1
    cpdef respond(self, Request req, int status, bytes body, bytes content_type, bytes extra_headers=*, str error_code=*)
    cpdef respond_error(self, Request req, int status, str code, str message, str error_type=*)
    cpdef finish(self, Request req, int status, str error_code=*)
    cpdef abort(self)
    cdef bint client_closes(self, Request req)
    cdef int _refuse(self, int status, str code, str message) except -1
    cdef int check_timeouts(self, double now) except -1
