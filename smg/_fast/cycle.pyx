# cython: language_level=3
"""One request's answer (RequestCycle): written in order on its client
connection, either complete at once (respond) or relayed piece by piece
(write, then finish). The cycle holds the request's admission slot and
records the outcome in its route's metrics when it ends; a route that
hands the answer to something else (a proxied call, the admission queue)
registers it as the cycle's source, which the connection then keeps
informed: the client leaving, back-pressure, the deadline."""

from cpython.bytes cimport PyBytes_GET_SIZE
from smg._fast.clock cimport monotonic
from smg._fast.routes cimport Route, status_line, error_body, anthropic_error_body


cdef class Connection:

    cdef bytes date_header(self):
        return b""

    cdef bint closes_after(self, Request req):
        return True

    cdef int response_done(self, RequestCycle cycle) except -1:
        return 0

    cpdef abort(self):
        pass


cdef RequestCycle new_cycle(Connection conn, Request req):
    """A cycle for `req` on `conn` (without a Python-level __init__ call:
    one is made per request)."""
    cdef RequestCycle cycle = RequestCycle.__new__(RequestCycle)
    cycle.conn = conn
    cycle.req = req
    cycle.flow = conn.flow
    cycle.done = False
    return cycle


# a streamed request body waiting for its call beyond this stops reading the client
DEF STREAM_BUFFER_BYTES = 262144


cdef class RequestCycle:

    # --- a streamed request body (the client connection feeds it, the call takes it) ---

    cdef int stream_part(self, bytes data) except -1:
        if self.body_parts is None:
            self.body_parts = []
        self.body_parts.append(data)
        self.body_buffered += PyBytes_GET_SIZE(data)
        self.body_last_at = monotonic()
        if self.body_buffered > STREAM_BUFFER_BYTES:
            self.flow.pause_reading()
        if self.source is not None:
            self.source.body_available()
        return 0

    cdef int stream_end(self) except -1:
        self.body_ended = True
        if self.source is not None:
            self.source.body_available()
        return 0

    cdef list take_body_parts(self):
        """The body received since the last call (the call sends it on)."""
        cdef list parts = self.body_parts
        self.body_parts = None
        self.body_buffered = 0
        if not self.body_ended and self.flow.read_paused and not self.conn.closed:
            self.flow.resume_reading()
        return parts if parts is not None else []

    cdef int write(self, bytes data) except -1:
        if not self.conn.closed:
            self.conn.transport.write(data)
        return 0

    cdef bint closes(self):
        """The connection closes after this response."""
        return self.conn.closes_after(self.req)

    cdef bytes date_header(self):
        return self.conn.date_header()

    cpdef respond(self, int status, bytes body, bytes content_type, bytes extra_headers=b"",
                  str error_code=None):
        """Send a complete response and end the cycle."""
        cdef Request req = self.req
        cdef list parts
        if self.done:
            return
        if not self.conn.closed:
            parts = [status_line(status), b"content-type: ", content_type,
                     b"\r\ncontent-length: ", str(len(body)).encode(),
                     b"\r\nx-request-id: ", req.request_id if req.request_id is not None else b"",
                     b"\r\n", extra_headers, req.cors, self.conn.date_header()]
            if self.conn.closes_after(req):
                parts.append(b"connection: close\r\n")
            parts.append(b"\r\n")
            if req.method != b"HEAD":
                parts.append(body)
            self.conn.transport.write(b"".join(parts))
        self.finish(status, error_code)

    cpdef respond_error(self, int status, str code, str message, str error_type=None, str param=None,
                        bytes extra_headers=b""):
        cdef bytes body
        if (<Route>self.req.route).anthropic:
            body = anthropic_error_body(status, message, self.req.request_id)
        else:
            body = error_body(status, code, message, error_type, param)
        self.respond(status, body, b"application/json", b"x-smg-error-code: " + code.encode() + b"\r\n" + extra_headers,
                     code)

    cpdef finish(self, int status, str error_code=None):
        """The response has been written in full."""
        if self.done:
            return
        self.end()
        (<Route>self.req.route).record(self.req.method, status, error_code, monotonic() - self.req.start)
        self.conn.response_done(self)

    cdef int hand_off(self, ResponseSource source) except -1:
        """`source` produces the response from now on (None: no longer)."""
        self.source = source
        self.flow.source = source
        return 0

    cdef int lost(self) except -1:
        """The client went away before the response ended."""
        cdef ResponseSource source = self.source
        if self.done:
            return 0
        self.end()
        if source is not None:
            source.client_lost()
        (<Route>self.req.route).record(self.req.method, 499, "client_closed_request", monotonic() - self.req.start)
        return 0

    cdef int end(self) except -1:
        cdef Admission adm = self.admission
        self.done = True
        if self.flow.source is self.source:
            self.flow.source = None
        self.source = None
        if adm is not None:
            self.admission = None
            adm.leave()
        return 0


cdef class RequestHandler:

    cdef int handle(self, RequestCycle cycle) except -1:
        cycle.respond_error(500, "internal_error", "route has no handler")
        return 0

    cdef bint can_stream(self, Request req):
        """Whether `req` may be handled before its body has arrived (the body
        then streams: RequestCycle.streaming)."""
        return False
