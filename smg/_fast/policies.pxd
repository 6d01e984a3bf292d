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


cdef class PinTable:
    cdef dict pins          # key -> [Worker, last used]
    cdef dict keys_of       # Worker -> pinned keys
    cdef public double max_idle
    cdef double last_sweep
    cdef public long long moved     # keys re-pinned because their worker could not take them
    cdef Worker get(self, bytes key, double now)
    cdef int put(self, bytes key, Worker w, double now) except -1
    cdef int count(self, Worker w)
    cdef unpin(self, bytes key, Worker w)
    cdef sweep(self, double now)
    cpdef worker_removed(self, Worker worker)


cdef class WorkerGroup:
    """The workers of one (worker type, model): routing candidates of a request."""
    cdef public str model_id
    cdef public int worker_type
    cdef public list workers    # every registered worker of the group
    cdef public list ready      # those in state ready (circuit breakers are checked per pick)
    cdef public Policy policy
    cdef public PinTable sticky  # --sticky-sessions (None: off)

    cdef Worker select(self, str text, bytes key, double now, Worker avoid, bytes sticky_key=*, bint prompt=*)
    cdef Worker pick(self, str text, bytes key, double now, Worker avoid, bint prompt)
    cpdef refresh(self)


cdef class Router:
    cdef public dict groups     # (worker_type, model_id) -> WorkerGroup
    cdef public object policy_factory   # callable(worker_type) -> Policy
    cdef public bint needs_text
    cdef public double sticky_max_idle
    cpdef WorkerGroup group(self, int worker_type, str model)
    cpdef list groups_of(self, int worker_type)
