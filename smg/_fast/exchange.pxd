from smg._fast.http1 cimport ResponseParser

cdef enum:
    # Exchange.upstream_failed stages
    FAIL_CONNECT = 0      # no connection could be made
    FAIL_BEFORE_HEAD = 1  # connection lost or broken before a response head
    FAIL_BODY = 2         # connection lost or broken in the middle of the body


cdef class Exchange:
    """One request/response exchange with a worker. Upstream connections and
    client connections call these hooks; subclasses are the proxy (relay to a
    client) and the control-plane fetch (collect the response)."""

    cdef public double deadline      # monotonic seconds; 0 = none
    cdef public bint resent          # already sent again after a stale keep-alive connection

    # begin the exchange (once admitted)
    cdef int start(self) except -1

    # upstream side
    cdef int upstream_ready(self, object conn) except -1
    cdef int upstream_response(self, object conn, ResponseParser parser, bytes data,
                               Py_ssize_t off, Py_ssize_t n) except -1
    cdef int upstream_body(self, object conn, bytes data, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int upstream_done(self, object conn) except -1
    cdef int upstream_failed(self, object conn, object exc, int stage) except -1
    # a reused keep-alive connection closed under the request before any answer
    cdef int upstream_stale(self, object conn) except -1
    cdef bint wants_decoded(self)

    # client side
    cdef int client_lost(self) except -1
    cdef int client_pause(self) except -1
    cdef int client_resume(self) except -1

    # the deadline passed
    cdef int expired(self, double now) except -1
