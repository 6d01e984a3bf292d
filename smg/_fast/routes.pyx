# cython: language_level=3
"""The routes the server answers and what they answer with: a Route (path,
methods, auth level, handler, per-route metrics), the Response a Python
handler returns, and the gateway's error shape."""

from http import HTTPStatus

import orjson

# smg_http_request_duration_seconds buckets, as the reference exports them
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
           45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 480.0, 900.0, 1200.0, 1800.0,
           2700.0, 3600.0, 5400.0, 7200.0)
cdef double _BOUNDS[N_BUCKETS]
cdef Py_ssize_t _finite_bounds = 0


def set_buckets(bounds):
    """The duration histograms' upper bounds (--prometheus-duration-buckets):
    positive, at most N_BUCKETS - 1 of them; the rest of the slots catch
    everything above (+Inf). Set before anything is observed."""
    global _finite_bounds
    cdef Py_ssize_t i
    values = sorted(set(float(b) for b in bounds))
    if not values or len(values) > N_BUCKETS - 1 or values[0] <= 0 or values[len(values) - 1] >= 1e300:
        raise ValueError(f"expected 1 to {N_BUCKETS - 1} positive, finite bucket bounds")
    for i in range(N_BUCKETS):
        _BOUNDS[i] = values[i] if i < len(values) else 1e300
    _finite_bounds = len(values)


def buckets():
    """The finite upper bounds in use (the histograms' last bucket is +Inf)."""
    return tuple(_BOUNDS[i] for i in range(_finite_bounds))


set_buckets(BUCKETS)

cdef dict _STATUS_LINES = {}
for _s in HTTPStatus:
    _STATUS_LINES[_s.value] = f"HTTP/1.1 {_s.value} {_s.phrase}\r\n".encode()
_STATUS_LINES[499] = b"HTTP/1.1 499 Client Closed Request\r\n"


cdef bytes status_line(int status):
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Status\r\n".encode()
    return <bytes>line


cpdef bytes error_body(int status, str code, str message, str error_type=None, str param=None):
    """The SMG error shape: {"error": {"type", "code", "message", "param"}}."""
    if error_type is None:
        error_type = "server_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps({"error": {"type": error_type, "code": code, "message": message, "param": param}})


cdef dict _ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    503: "overloaded_error", 529: "overloaded_error",
}


cpdef str anthropic_error_type(int status):
    t = _ANTHROPIC_TYPES.get(status)
    if t is not None:
        return <str>t
    return "api_error" if status >= 500 else "invalid_request_error"


cpdef bytes anthropic_error_body(int status, str message, bytes request_id):
    """The Anthropic API's error shape: {"type": "error", "error": {"type",
    "message"}, "request_id"}."""
    return orjson.dumps({"type": "error", "error": {"type": anthropic_error_type(status), "message": message},
                         "request_id": request_id.decode("latin-1") if request_id is not None else None})


class Response:
    """What a Python route handler returns."""
    __slots__ = ("status", "body", "content_type", "headers", "error_code")

    def __init__(self, int status=200, bytes body=b"", bytes content_type=b"application/json",
                 bytes headers=b"", str error_code=None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.error_code = error_code


def json_response(obj, int status=200, bytes headers=b""):
    return Response(status, orjson.dumps(obj), b"application/json", headers)


def text_response(str text, int status=200):
    return Response(status, text.encode(), b"text/plain; charset=utf-8")


def error_response(int status, str code, str message, str error_type=None, bytes headers=b""):
    return Response(status, error_body(status, code, message, error_type), b"application/json",
                    b"x-smg-error-code: " + code.encode() + b"\r\n" + headers, code)


cdef class Histogram:

    def __cinit__(self):
        cdef int i
        for i in range(N_BUCKETS):
            self.counts[i] = 0
        self.total = 0.0
        self.count = 0

    cdef void observe(self, double value) noexcept:
        cdef int i = 0
        while value > _BOUNDS[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.count += 1

    def snapshot(self):
        """(cumulative bucket counts for buckets() + +Inf, then slots that
        repeat the +Inf count when fewer bounds are in use; sum, count)."""
        cdef list out = []
        cdef long long acc = 0
        cdef int i
        for i in range(N_BUCKETS):
            acc += self.counts[i]
            out.append(acc)
        return out, self.total, self.count


cdef dict _AUTH_LEVELS = {"none": AUTH_NONE, "serving": AUTH_DATA, "admin": AUTH_ADMIN}


cdef class Route:

    def __init__(self, str path, methods, handler=None, native=None, str auth="none",
                 bytes id_prefix=b"req-", str errors="openai"):
        """auth: "none", "serving" (--api-key) or "admin" (--admin-api-key, else --api-key).
        errors: the shape of the gateway's errors, "openai" or "anthropic"
        (the Messages API, whose clients also send their key as x-api-key)."""
        if errors not in ("openai", "anthropic"):
            raise ValueError(f"unknown error shape {errors!r}")
        self.anthropic = errors == "anthropic"
        self.path = path
        self.methods = frozenset(m.encode() if isinstance(m, str) else m for m in methods)
        self.handler = handler
        self.native = native
        self.auth = _AUTH_LEVELS[auth]
        self.id_prefix = id_prefix
        self.allow_header = b"allow: " + b", ".join(sorted(self.methods)) + b"\r\n"
        self.requests = {}
        self.coded_responses = {}
        self.durations = {}

    def __repr__(self):
        return f"<Route {self.path}>"

    cdef int count_request(self, bytes method) except -1:
        self.requests[method] = self.requests.get(method, 0) + 1
        return 0

    def response_counts(self):
        """{(status, error_code or None): count} of the responses so far."""
        counts = dict(self.coded_responses)
        for status in range(600):
            if self.plain_responses[status]:
                counts[(status, None)] = self.plain_responses[status]
        return counts

    cdef void record(self, bytes method, int status, str error_code, double seconds):
        cdef Histogram h
        if not error_code and 0 <= status < 600:
            # most responses: an array slot, not a dict keyed by a fresh tuple
            self.plain_responses[status] += 1
        else:
            key = (status, error_code)
            self.coded_responses[key] = self.coded_responses.get(key, 0) + 1
        h = self.durations.get(method)
        if h is None:
            h = Histogram()
            self.durations[method] = h
        h.observe(seconds)
