cdef class ResponseSource:
    """What produces the response of a request once its route has handed it
    off: a proxied call, or a place in the admission queue. The client's
    side reaches it here: the client leaving, its socket filling and
    draining, the deadline passing."""
    cdef public double deadline          # monotonic seconds; 0 = none

    cdef int client_lost(self) except -1
    cdef int client_pause(self) except -1
    cdef int client_resume(self) except -1
    cdef int expired(self, double now) except -1
    # the connection's periodic tick while this source produces the response
    cdef int tick(self, double now) except -1
    # a streamed request body (RequestCycle.streaming): more of it can be
    # taken (or its end), or it stalled / broke a limit
    cdef int body_available(self) except -1
    cdef int body_failed(self, int status, str code, str message) except -1


cdef class FlowControl:
    """Back-pressure on one client connection, consulted by both directions.
    Reading from the client stops while enough waits behind a pending
    response; writing to the client backs up when its socket buffer is full,
    and then the response's source stops reading its worker."""
    cdef object transport
    cdef public bint read_paused
    cdef public bint write_paused
    cdef public ResponseSource source     # the active response's, told of write pauses

    cdef int pause_reading(self) except -1
    cdef int resume_reading(self) except -1
    cdef int pause_writing(self) except -1
    cdef int resume_writing(self) except -1
