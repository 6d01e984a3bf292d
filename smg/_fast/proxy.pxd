from smg._fast.exchange cimport Exchange
from smg._fast.http1 cimport ResponseParser
from smg._fast.server cimport ClientConnection, Request, RequestHandler
from smg._fast.worker cimport Worker
from smg._fast.policies cimport Router, WorkerGroup


cdef bytes upstream_status_line(ResponseParser p)
cdef bint retryable_status(int status) noexcept
cdef bint failure_status(int status) noexcept
cdef bytes relay_head(ResponseParser p, ClientConnection conn, Request req, Worker w, bint decoded,
                      bint* wrap, long long content_length=*)
cdef bytes wrap_chunk(bytes data, Py_ssize_t off, Py_ssize_t n)
cdef bint end_stream_with_error(ClientConnection conn, Request req, ResponseParser p, bint wrapped, int status,
                                str code, str message)
cdef WorkerGroup resolve_group(Router router, ClientConnection conn, Request req, str model, int worker_type)
cdef object parse_body(ClientConnection conn, Request req, int endpoint)
cdef bytes routing_key(Request req)
cdef bytes forwarded_head(Request req, Py_ssize_t body_len)


cdef class ProxiedRoute(RequestHandler):
    """What the regular and the PD handler of a proxied route share."""
    cdef public ProxySettings settings
    cdef public int endpoint
    cdef public str endpoint_name

    cdef int launch(self, ClientConnection conn, Request req, Exchange call) except -1


cdef class ProxySettings:
    cdef public Router router
    cdef public object loop
    cdef public int max_attempts
    cdef public double backoff_initial
    cdef public double backoff_max
    cdef public double backoff_multiplier
    cdef public double backoff_jitter
    cdef public double request_timeout
    cdef public dict retries
    cdef public dict retries_exhausted

    cdef double backoff(self, int retry_index)
    cdef int count_retry(self, int worker_type, str endpoint) except -1
    cdef int count_exhausted(self, int worker_type, str endpoint) except -1
