from smg._fast.flow cimport ResponseSource


cdef class Admission:
    """--max-concurrent-requests with a FIFO queue (--queue-size,
    --queue-timeout-secs) in front of the proxied routes."""
    cdef public long limit               # <= 0: unlimited
    cdef public long active
    cdef public long queue_size
    cdef public double queue_timeout
    cdef object waiting                  # deque of Waiter
    cdef public long long rejected_full
    cdef public long long rejected_timeout

    cdef bint try_enter(self)
    cdef bint enqueue(self, Waiter waiter)
    cdef int leave(self) except -1


cdef class Waiter(ResponseSource):
    """A request waiting for an admission slot: its cycle's source
    meanwhile, so that its deadline and the client leaving reach it."""
    cdef Admission admission
    cdef object cycle                    # smg._fast.cycle.RequestCycle
    cdef object start                    # callable: starts the request once admitted
    cdef bint cancelled
