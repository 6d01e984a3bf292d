# cython: language_level=3
"""Admission control for the proxied routes: at most
--max-concurrent-requests at once, then a FIFO queue of --queue-size
waiting at most --queue-timeout-secs, then 429. A request holds its slot
(the cycle's admission) until its response ends, when the cycle calls
leave()."""

import logging
from collections import deque

from smg._fast.clock cimport monotonic
from smg._fast.cycle cimport RequestCycle
from smg._fast.routes import error_response

_log = logging.getLogger("smg.server")


cdef class Admission:

    def __init__(self, long limit=-1, long queue_size=100, double queue_timeout=60.0):
        self.limit = limit
        self.active = 0
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.waiting = deque()
        self.rejected_full = 0
        self.rejected_timeout = 0

    @property
    def queue_depth(self):
        return sum(1 for w in self.waiting if not (<Waiter>w).cancelled)

    cdef bint try_enter(self):
        """Take a slot if one is free (the caller marks its request as holding it)."""
        if self.limit > 0 and self.active >= self.limit:
            return False
        self.active += 1
        return True

    cdef bint enqueue(self, Waiter waiter):
        while self.waiting and (<Waiter>self.waiting[0]).cancelled:
            self.waiting.popleft()
        if len(self.waiting) >= self.queue_size:
            self.rejected_full += 1
            return False
        self.waiting.append(waiter)
        return True

    cdef int leave(self) except -1:
        """A slot frees: the next waiting request that is still there starts."""
        cdef Waiter w
        self.active -= 1
        while self.waiting and (self.limit <= 0 or self.active < self.limit):
            w = <Waiter>self.waiting.popleft()
            if w.cancelled or w.cycle.done:
                continue
            self.active += 1
            w.cycle.admission = self
            w.cancelled = True
            (<RequestCycle>w.cycle).hand_off(None)
            try:
                w.start()
            except Exception:
                _log.exception("starting a queued request failed")
                w.cycle.respond_error(500, "internal_error", "internal error")
        return 0


cdef class Waiter(ResponseSource):

    def __init__(self, Admission admission, cycle, start):
        self.admission = admission
        self.cycle = cycle
        self.start = start
        self.cancelled = False
        self.deadline = monotonic() + admission.queue_timeout

    cdef int client_lost(self) except -1:
        self.cancelled = True
        return 0

    cdef int expired(self, double now) except -1:
        if self.cancelled:
            return 0
        self.cancelled = True
        self.admission.rejected_timeout += 1
        _answer(self.cycle, error_response(
            429, "queue_timeout", "The request waited too long for a free slot (--queue-timeout-secs)",
            headers=b"retry-after: 1\r\n"))
        return 0


def queue_or_reject(Admission adm, cycle, start):
    """No admission slot is free (Admission.try_enter failed): queue the
    request, to start() when a slot frees, or answer 429 when the queue is
    full."""
    cdef Waiter waiter = Waiter(adm, cycle, start)
    if adm.enqueue(waiter):
        (<RequestCycle>cycle).hand_off(waiter)
        return
    _answer(cycle, error_response(429, "too_many_requests",
                                      "The gateway is at --max-concurrent-requests and its queue is full",
                                      headers=b"retry-after: 1\r\n"))


cdef _answer(cycle, resp):
    cycle.respond(resp.status, resp.body, resp.content_type, resp.headers, resp.error_code)
