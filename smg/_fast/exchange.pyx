# cython: language_level=3
from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport FAIL_BEFORE_HEAD


cdef class Exchange:

    cdef int upstream_ready(self, object conn) except -1:
        return 0

    cdef int upstream_response(self, object conn, ResponseParser parser, bytes data,
                               Py_ssize_t off, Py_ssize_t n) except -1:
        return 0

    cdef int upstream_body(self, object conn, bytes data, Py_ssize_t off, Py_ssize_t n) except -1:
        return 0

    cdef int upstream_done(self, object conn) except -1:
        return 0

    cdef int upstream_failed(self, object conn, object exc, int stage) except -1:
        return 0

    cdef int upstream_stale(self, object conn) except -1:
        """By default: send once more on a fresh connection, without the
        exchange noticing (the control plane's probes). Exchanges with a
        retry budget count this send against it instead."""
        from smg._fast.upstream import UpstreamClosed

        if self.resent:
            return self.upstream_failed(conn, UpstreamClosed("worker closed the connection before responding"),
                                        FAIL_BEFORE_HEAD)
        self.resent = True
        conn.resend(self)
        return 0

    cdef bint wants_decoded(self):
        return False

    cdef int upstream_writable(self, bint writable) except -1:
        return 0
