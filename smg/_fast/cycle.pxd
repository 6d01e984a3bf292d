from smg._fast.request cimport Request
from smg._fast.flow cimport FlowControl, ResponseSource
from smg._fast.admission cimport Admission


cdef class Connection:
    """What a request cycle needs of the client connection it answers on
    (smg._fast.server.ClientConnection)."""
    cdef public object transport
    cdef public FlowControl flow
    cdef public bint closed
    cdef public RequestCycle active      # the request being answered

    cdef bytes date_header(self)
    cdef bint closes_after(self, Request req)
    cdef int response_done(self, RequestCycle cycle) except -1
    cpdef abort(self)


cdef class RequestCycle:
    cdef public Request req
    cdef public Connection conn
    cdef public FlowControl flow
    cdef public ResponseSource source    # set by hand_off
    cdef public Admission admission      # the slot held until the response ends
    cdef public bint done
    # a streamed request body (--max-buffered-request-bytes): the parts
    # received and not yet taken by the call, and whether the body ended
    cdef public bint streaming
    cdef list body_parts
    cdef public Py_ssize_t body_buffered
    cdef public bint body_ended
    cdef public double body_last_at

    cdef int write(self, bytes data) except -1
    cpdef respond(self, int status, bytes body, bytes content_type, bytes extra_headers=*, str error_code=*)
    cpdef respond_error(self, int status, str code, str message, str error_type=*, str param=*,
                        bytes extra_headers=*)
    cpdef finish(self, int status, str error_code=*)
    cdef int hand_off(self, ResponseSource source) except -1
    cdef int lost(self) except -1
    cdef bint closes(self)
    cdef bytes date_header(self)
    cdef int end(self) except -1
    cdef int stream_part(self, bytes data) except -1
    cdef int stream_end(self) except -1
    cdef list take_body_parts(self)


cdef RequestCycle new_cycle(Connection conn, Request req)


cdef class RequestHandler:
    """A route served in Cython (the proxied routes); Python routes use plain callables."""
    cdef int handle(self, RequestCycle cycle) except -1
    cdef bint can_stream(self, Request req)
