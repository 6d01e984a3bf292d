from smg._fast.http1 cimport ResponseParser
from smg._fast.exchange cimport Exchange


cdef class ConnectWaiter


cdef class UpstreamPool:
    """Keep-alive HTTP/1.1 connections to one worker address."""
    cdef public str host
    cdef public int port
    cdef public double idle_timeout
    cdef public bint closed
    cdef public int open_count          # connected (idle + busy)
    cdef public int connecting
    cdef public double connect_timeout  # seconds; 0: none
    cdef public int max_connections     # open and connecting at most; 0: no cap
    cdef public long long connect_timeouts_total
    cdef object ssl_context             # TLS to the worker, or None
    cdef list idle                      # LIFO stack of UpstreamConnection
    cdef object queue                   # ConnectWaiters waiting for a connection slot (FIFO)
    cdef object loop

    cdef UpstreamConnection take_idle(self)
    cdef ConnectWaiter acquire(self, Exchange ex, bint fresh=*)
    cdef int connect(self, ConnectWaiter waiter) except -1
    cdef int release(self, UpstreamConnection conn) except -1
    cdef int forget(self, UpstreamConnection conn) except -1
    cdef int admit_queued(self) except -1


cdef class ConnectWaiter:
    cdef UpstreamPool pool
    cdef Exchange ex
    cdef public bint cancelled
    cdef object timer                   # the connect timeout
    cdef bint timed_out


cdef class UpstreamConnection:
    cdef public object transport
    cdef UpstreamPool pool
    cdef Exchange ex
    cdef ResponseParser parser
    cdef public bint closed
    cdef public bint reused             # came from the idle stack
    cdef public bint got_bytes          # received anything for the current exchange
    cdef double sent_at                 # when the current exchange was attached (its request sent)
    cdef bint reading_paused
    cdef double idle_since
    cdef list decoded
    cdef public bint sending            # the request's body is still being sent (not reusable yet)

    cdef int attach(self, Exchange ex, bint head_only) except -1
    cdef int send(self, bytes data) except -1
    cdef int send2(self, bytes head, object body) except -1
    cdef int discard(self) except -1
    cdef int abort(self) except -1
    cdef int pause_reading(self) except -1
    cdef int resume_reading(self) except -1
    cdef int _message_done(self) except -1
    cdef int _fail(self, object exc, int stage) except -1
