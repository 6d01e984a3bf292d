cdef enum:
    # Worker.state
    STATE_PENDING = 0
    STATE_READY = 1
    STATE_NOT_READY = 2
    STATE_FAILED = 3
    STATE_DRAINING = 4

cdef enum:
    # Worker.worker_type
    TYPE_REGULAR = 0
    TYPE_PREFILL = 1
    TYPE_DECODE = 2

cdef enum:
    # Worker.cb_state, as exported in smg_worker_cb_state
    CB_CLOSED = 0
    CB_OPEN = 1
    CB_HALF_OPEN = 2


cdef class Worker:
    """One worker as the data plane sees it: address, routing state, load,
    circuit breaker. The control plane (smg.workers.Registry) owns its
    lifecycle; the data plane reads it on every request."""

    cdef public str id
    cdef public str url
    cdef public str host
    cdef public int port
    cdef public bint tls                # an https:// worker
    cdef public str model_id
    cdef public int worker_type
    cdef public object bootstrap_port
    cdef public dict labels
    cdef public int state
    cdef public str api_key
    cdef public bytes host_header       # "host: h:p\r\n"
    cdef public bytes auth_header       # "authorization: Bearer k\r\n" from api_key, or None
    cdef public bytes url_header        # "x-smg-routed-worker-id: url\r\n"
    cdef readonly unsigned long long url_hash   # stable across processes and hosts (placement)
    cdef public object pool             # smg._fast.upstream.UpstreamPool: the proxy's connections
    cdef public object control_pool     # the control plane's (probes, health checks, fan-out)
    cdef public object info             # dict of what registration learned

    # load: requests in flight through this gateway, and all ever routed
    cdef public long inflight
    # of those in flight, the ones not answering yet: a streamed answer
    # starts with its first token, any other arrives whole at the end
    cdef public long unanswered
    cdef public long long routed
    cdef public long long requests_total
    # queued prefill as this gateway sees it: the characters of prompt it has
    # sent the worker that are not answered yet, less what the routing tree
    # says is cached there (only cache_aware estimates it; 0 otherwise).
    # The policy that picks the worker puts the estimate for the request
    # about to be sent in next_prefill_chars; its leg moves it here.
    cdef public long long prefill_queue_chars
    cdef public long long next_prefill_chars

    # circuit breaker
    cdef public bint cb_enabled
    cdef public int cb_state
    cdef public int cb_failures
    cdef public int cb_successes
    cdef public int cb_failure_threshold
    cdef public int cb_success_threshold
    cdef public double cb_timeout
    cdef public double cb_window          # --cb-window-duration-secs (0: no window)
    cdef public double cb_opened_at
    cdef public double cb_first_failure_at
    cdef public object cb_listener      # callable(worker, old_state, new_state)
    # --prefill-max-inflight-requests-per-worker: a prefill worker with this
    # many requests in flight takes no more (0: no limit); capacity_listener(worker)
    # is called when it drops below
    cdef public int max_inflight
    cdef public object capacity_listener
    cdef public long long cb_outcome_success
    cdef public long long cb_outcome_failure

    # --dp-aware: a worker whose engine runs dp_size data-parallel ranks is
    # routed to as one view per rank (each its own cache and load); a view
    # has dp_rank >= 0 and its registered worker as dp_parent
    # the last failure seen talking to it (a request or a health check), for GET /workers
    cdef public str last_error
    cdef public double last_error_at    # time.time()
    cdef public int dp_size
    cdef public int dp_rank
    cdef public Worker dp_parent
    cdef public list dp_views

    cdef void take_request(self) noexcept
    cdef void answered(self) noexcept
    cdef int end_request(self, int outcome) except -1
    cdef bint routable(self, double now) noexcept
    cpdef record_outcome(self, bint success, double now)
    cdef void _cb_move(self, int new_state, double now) noexcept
