from smg._fast.cycle cimport RequestCycle, RequestHandler
from smg._fast.request cimport Request
from smg._fast.call cimport CallSettings, ClientCall, RouterSeries
from smg._fast.policies cimport Router, WorkerGroup


cdef enum:
    # A routing text longer than this is not kept for the call's retries: the
    # body holds the same characters, and a retry reads them from it again.
    KEPT_TEXT_CHARS = 65536


cdef WorkerGroup resolve_group(Router router, RequestCycle cycle, str model, int worker_type)
cdef object parse_body(RequestCycle cycle, int endpoint)
cdef object resolve_alias(CallSettings settings, RequestCycle cycle, dict obj)
cdef bytes routing_key(Request req)
cdef bytes session_key(Request req)
cdef str model_label(Router router, object model, int worker_type)


cdef class ProxiedRoute(RequestHandler):
    """What the regular and the PD handler of a proxied route share."""
    cdef public CallSettings settings
    cdef public int endpoint
    cdef public str endpoint_name
    cdef str counted_label               # the model label of the last count_routed ...
    cdef RouterSeries counted_series     # ... and its series

    cdef RouterSeries count_routed(self, str backend, str label, bint streamed)
    cdef int launch(self, ClientCall call) except -1
    cdef int no_group(self, RequestCycle cycle, str backend, str label, int worker_type) except -1
