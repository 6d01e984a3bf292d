# cython: language_level=3
"""The worker record shared by the data plane (policies, proxy) and the
control plane (registry, health checks)."""

import logging
import time
import re

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from smg._fast.clock cimport monotonic
from smg._fast.hashing cimport fnv1a

_log = logging.getLogger("smg.workers")

STATE_NAMES = ("pending", "ready", "not_ready", "failed", "draining")
TYPE_NAMES = ("regular", "prefill", "decode")
CB_NAMES = ("closed", "open", "half_open")
# how far a breaker is from closed, by cb_state (merging several processes' views: the most restrictive wins)
CB_SEVERITY = {0: 0, 2: 1, 1: 2}

PENDING = STATE_PENDING
READY = STATE_READY
NOT_READY = STATE_NOT_READY
FAILED = STATE_FAILED
DRAINING = STATE_DRAINING
REGULAR = TYPE_REGULAR
PREFILL = TYPE_PREFILL
DECODE = TYPE_DECODE
CLOSED = CB_CLOSED
OPEN = CB_OPEN
HALF_OPEN = CB_HALF_OPEN


# what a worker URL's host may be: a DNS name or an IPv4 address, or (in
# brackets) an IPv6 address with an optional zone
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?\Z")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}(?:%[A-Za-z0-9_.-]{1,32})?\Z")
MAX_URL_LENGTH = 2048


def split_url(str url):
    """'http://h:p' -> (host, port). IPv6 hosts come bracketed in URLs and
    are returned without brackets. Raises ValueError on a bad URL."""
    cdef str rest, host, port_s
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"URL longer than {MAX_URL_LENGTH} characters")
    if url.startswith("http://"):
        rest = url[7:]
        default_port = 80
    elif url.startswith("https://"):
        rest = url[8:]
        default_port = 443
    else:
        raise ValueError(f"{url}: URL must start with http:// or https://")
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest or "#" in rest or "@" in rest:
        raise ValueError(f"{url}: URL must be scheme://host[:port] with no path")
    if not rest:
        raise ValueError(f"{url}: URL has no host")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"{url}: unterminated IPv6 address")
        host = rest[1:end]
        if not _IPV6.match(host):
            raise ValueError(f"{url}: invalid IPv6 address {host!r}")
        tail = rest[end + 1:]
        if tail and not tail.startswith(":"):
            raise ValueError(f"{url}: invalid port")
        port_s = tail[1:]
    else:
        host, sep, port_s = rest.partition(":")
        if sep and not port_s:
            raise ValueError(f"{url}: invalid port")
        if ":" in port_s:
            raise ValueError(f"{url}: bracket IPv6 addresses, e.g. http://[::1]:8000")
        if host and not _HOSTNAME.match(host):
            raise ValueError(f"{url}: invalid host {host!r}")
    if not host:
        raise ValueError(f"{url}: URL has no host")
    if port_s:
        if not port_s.isdigit() or not (0 < int(port_s) < 65536):
            raise ValueError(f"{url}: invalid port {port_s!r}")
        port = int(port_s)
    else:
        port = default_port
    return host, port


cdef class Worker:

    def __init__(self, str worker_id, str url, str model_id="unknown", int worker_type=TYPE_REGULAR,
                 bootstrap_port=None, dict labels=None, str api_key=None):
        self.id = worker_id
        self.url = url.rstrip("/")
        self.host, self.port = split_url(self.url)
        self.tls = self.url.startswith("https://")
        self.model_id = model_id
        self.worker_type = worker_type
        self.bootstrap_port = bootstrap_port
        self.labels = labels if labels is not None else {}
        self.state = STATE_PENDING
        self.api_key = api_key
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.host_header = f"host: {authority}\r\n".encode("latin-1")
        self.auth_header = f"authorization: Bearer {api_key}\r\n".encode("latin-1") if api_key else None
        self.url_header = f"x-smg-routed-worker-id: {self.url}\r\n".encode("latin-1")
        cdef bytes url_bytes = self.url.encode("utf-8")
        self.url_hash = fnv1a(<const unsigned char*>PyBytes_AS_STRING(url_bytes), PyBytes_GET_SIZE(url_bytes))
        self.pool = None
        self.control_pool = None
        self.info = {}
        self.inflight = 0
        self.unanswered = 0
        self.routed = 0
        self.prefill_queue_chars = 0
        self.next_prefill_chars = 0
        self.requests_total = 0
        self.cb_enabled = True
        self.cb_state = CB_CLOSED
        self.cb_failures = 0
        self.cb_successes = 0
        self.cb_failure_threshold = 10
        self.cb_success_threshold = 3
        self.cb_timeout = 60.0
        self.cb_window = 120.0
        self.cb_opened_at = 0.0
        self.cb_first_failure_at = 0.0
        self.cb_listener = None
        self.max_inflight = 0
        self.capacity_listener = None
        self.cb_outcome_success = 0
        self.cb_outcome_failure = 0
        self.last_error = None
        self.last_error_at = 0.0
        self.dp_size = 0
        self.dp_rank = -1
        self.dp_parent = None
        self.dp_views = []

    def note_error(self, str message):
        """Remember the last failure (views report it to their worker too)."""
        self.last_error = message
        self.last_error_at = time.time()
        if self.dp_parent is not None:
            self.dp_parent.note_error(f"rank {self.dp_rank}: {message}")

    def rank_views(self):
        """--dp-aware: one view of this worker per data-parallel rank (made
        once dp_size is known), routed to as "URL@rank". A view shares the
        worker's connections and follows its state; it has its own load and
        circuit breaker, and its requests count in the worker's load too."""
        cdef Worker v
        cdef int r
        if len(self.dp_views) != self.dp_size:
            self.dp_views = []
            for r in range(self.dp_size):
                v = Worker(f"{self.id}@{r}", self.url, self.model_id, self.worker_type, self.bootstrap_port,
                           self.labels, self.api_key)
                v.url = f"{self.url}@{r}"
                v.url_header = f"x-smg-routed-worker-id: {v.url}\r\n".encode("latin-1")
                url_bytes = v.url.encode("utf-8")
                v.url_hash = fnv1a(<const unsigned char*>PyBytes_AS_STRING(url_bytes), PyBytes_GET_SIZE(url_bytes))
                v.dp_rank = r
                v.dp_size = self.dp_size
                v.dp_parent = self
                v.pool = self.pool
                v.control_pool = self.control_pool
                v.info = self.info
                v.cb_enabled = self.cb_enabled
                v.cb_failure_threshold = self.cb_failure_threshold
                v.cb_success_threshold = self.cb_success_threshold
                v.cb_timeout = self.cb_timeout
                v.cb_window = self.cb_window
                v.cb_listener = self.cb_listener
                v.max_inflight = self.max_inflight
                v.capacity_listener = self.capacity_listener
                self.dp_views.append(v)
        for v in self.dp_views:
            v.state = self.state
            v.model_id = self.model_id
        return list(self.dp_views)

    def __repr__(self):
        return f"<Worker {self.url} {STATE_NAMES[self.state]} {TYPE_NAMES[self.worker_type]} model={self.model_id}>"

    @property
    def cb_state_name(self):
        return CB_NAMES[self.cb_state]

    cdef void take_request(self) noexcept:
        """A request (or one attempt of it) was sent here."""
        self.inflight += 1
        self.unanswered += 1
        self.routed += 1
        self.requests_total += 1
        if self.dp_parent is not None:
            self.dp_parent.take_request()

    cdef void answered(self) noexcept:
        """A request sent here has begun answering (see unanswered)."""
        self.unanswered -= 1
        if self.dp_parent is not None:
            self.dp_parent.answered()

    cdef int end_request(self, int outcome) except -1:
        """That request ended: outcome 1 success, 0 failure (both told to the
        circuit breaker), -1 neither (the client left, or already recorded)."""
        self.inflight -= 1
        if self.dp_parent is not None:
            self.dp_parent.inflight -= 1
        if outcome >= 0:
            self.record_outcome(outcome == 1, monotonic())
        if self.max_inflight > 0 and self.inflight == self.max_inflight - 1 and self.capacity_listener is not None:
            try:
                self.capacity_listener(self)
            except Exception:
                _log.exception("capacity listener failed")
        return 0

    cdef bint routable(self, double now) noexcept:
        if self.state != STATE_READY:
            return False
        if self.max_inflight > 0 and self.inflight >= self.max_inflight:
            return False
        if not self.cb_enabled or self.cb_state != CB_OPEN:
            return True
        if now - self.cb_opened_at >= self.cb_timeout:
            self._cb_move(CB_HALF_OPEN, now)
            return True
        return False

    cpdef record_outcome(self, bint success, double now):
        """One attempt's result, for the circuit breaker: success, or a
        failure (408, 429, 5xx, transport error)."""
        if success:
            self.cb_outcome_success += 1
        else:
            self.cb_outcome_failure += 1
        if not self.cb_enabled:
            return
        if self.cb_state == CB_CLOSED:
            if success:
                self.cb_failures = 0
            else:
                # consecutive failures count within the window from the first of them
                if self.cb_failures == 0 or (self.cb_window > 0 and now - self.cb_first_failure_at > self.cb_window):
                    self.cb_failures = 0
                    self.cb_first_failure_at = now
                self.cb_failures += 1
                if self.cb_failures >= self.cb_failure_threshold:
                    self._cb_move(CB_OPEN, now)
        elif self.cb_state == CB_HALF_OPEN:
            if success:
                self.cb_successes += 1
                if self.cb_successes >= self.cb_success_threshold:
                    self._cb_move(CB_CLOSED, now)
            else:
                self._cb_move(CB_OPEN, now)
        elif self.cb_state == CB_OPEN and not success:
            self.cb_opened_at = now

    cdef void _cb_move(self, int new_state, double now) noexcept:
        cdef int old = self.cb_state
        self.cb_state = new_state
        self.cb_failures = 0
        self.cb_successes = 0
        if new_state == CB_OPEN:
            self.cb_opened_at = now
        if self.cb_listener is not None:
            try:
                self.cb_listener(self, old, new_state)
            except Exception:
                _log.exception("circuit breaker listener failed")
