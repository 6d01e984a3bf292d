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


cdef class Route:
    cdef public str path
    cdef public frozenset methods
    cdef public object handler           # Python callable(Request) -> Response | awaitable
    cdef public object native            # smg._fast.cycle.RequestHandler
    cdef public int auth
    cdef public bytes id_prefix
    cdef public bytes allow_header
    cdef public bint anthropic           # errors in the Anthropic API's shape
    # metrics, read by smg.metrics at scrape time
    cdef public dict requests            # method -> count
    cdef dict coded_responses            # (status, error_code) -> count, for responses with an error code
    cdef long long plain_responses[600]  # status -> count, for the others (see response_counts)
    cdef public dict durations           # method -> Histogram

    cdef int count_request(self, bytes method) except -1
    cdef void record(self, bytes method, int status, str error_code, double seconds)


cdef bytes status_line(int status)
cpdef bytes error_body(int status, str code, str message, str error_type=*, str param=*)
cpdef str anthropic_error_type(int status)
cpdef bytes anthropic_error_body(int status, str message, bytes request_id)
