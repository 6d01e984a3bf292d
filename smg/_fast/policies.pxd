from libc.stdint cimport uint64_t
from smg._fast.worker cimport Worker


cdef uint64_t rand64() noexcept


cdef class Policy:
    cdef public str name
    cdef public bint needs_text
    cdef public bint header_key_only     # keyed by X-SMG-Routing-Key alone (no Authorization fallback)
    cdef Worker pick(self, list ready, str text, bytes key, double now)
    cpdef workers_changed(self, list workers)
    cpdef worker_removed(self, Worker worker)


cdef class WorkerGroup:
    """The workers of one (worker type, model): routing candidates of a request."""
    cdef public str model_id
    cdef public int worker_type
    cdef public list workers    # every registered worker of the group
    cdef public list ready      # those in state ready (circuit breakers are checked per pick)
    cdef public Policy policy

    cdef Worker select(self, str text, bytes key, double now, Worker avoid)
    cpdef refresh(self)


cdef class Router:
    cdef public dict groups     # (worker_type, model_id) -> WorkerGroup
    cdef public object policy_factory   # callable(worker_type) -> Policy
    cdef public bint needs_text
    cpdef WorkerGroup group(self, int worker_type, str model)
    cpdef list groups_of(self, int worker_type)
