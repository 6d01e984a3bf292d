# cython: language_level=3
from smg._fast.http1 cimport ResponseParser


cdef class Exchange:

    cdef int start(self) except -1:
        return 0

    def start_py(self):
        self.start()

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

    cdef bint wants_decoded(self):
        return False

    cdef int client_lost(self) except -1:
        return 0

    cdef int client_pause(self) except -1:
        return 0

    cdef int client_resume(self) except -1:
        return 0

    cdef int expired(self, double now) except -1:
        return 0
