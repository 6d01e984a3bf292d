from smg._fast.http1 cimport ResponseParser

cdef enum:
    # Exchange.upstream_failed stages
    FAIL_CONNECT = 0      # no connection could be made
    FAIL_BEFORE_HEAD = 1  # connection lost or broken before a response head
    FAIL_BODY = 2         # connection lost or broken in the middle of the body


cdef class Exchange:
    """One request/response exchange with a worker, as its upstream
    connection reports it: a leg of a proxied call (smg._fast.call) or a
    control-plane fetch (smg._fast.fetch)."""

    cdef public bint resent          # already sent again after a stale keep-alive connection

    cdef int upstream_ready(self, object conn) except -1
    cdef int upstream_response(self, object conn, ResponseParser parser, bytes data,
                               Py_ssize_t off, Py_ssize_t n) except -1
    cdef int upstream_body(self, object conn, bytes data, Py_ssize_t off, Py_ssize_t n) except -1
    cdef int upstream_done(self, object conn) except -1
    cdef int upstream_failed(self, object conn, object exc, int stage) except -1
    # a reused keep-alive connection closed under the request before any answer
    cdef int upstream_stale(self, object conn) except -1
    cdef bint wants_decoded(self)
    # the upstream socket's send buffer filled (False) or drained (True)
    cdef int upstream_writable(self, bint writable) except -1
