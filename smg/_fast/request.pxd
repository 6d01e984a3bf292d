from cpython.object cimport PyObject


cdef class Request:
    """A client's request as parsed: the request line, the headers the
    gateway uses (raw values), the body, and what the server decided when
    its headers were complete (route, request id, refusal)."""
    cdef public bytes method
    cdef public bytes url
    cdef public str path
    cdef public bytes query
    cdef public object body              # bytes once complete
    cdef PyObject* body_buf              # a body of several parts, filled in place (see add_body)
    cdef public long long body_len
    cdef public bint keep_alive
    cdef public int http_minor
    cdef public double start
    cdef public object route             # smg._fast.routes.Route
    cdef public bytes request_id
    cdef public bint id_from_client
    cdef public bytes authorization
    cdef public bytes x_api_key          # the Anthropic API's credential header
    cdef public bytes traceparent
    cdef public bytes tracestate
    cdef public bytes routing_key
    cdef public bytes forwarded_for
    cdef public bytes content_type
    cdef public bytes content_length
    cdef public bytes expect
    cdef public bytes connection
    cdef public bint chunked             # Transfer-Encoding present: a body follows
    cdef public bytes origin             # CORS: the Origin header
    cdef public bytes cors_method        # CORS preflight: Access-Control-Request-Method
    cdef public bytes cors_headers       # CORS preflight: Access-Control-Request-Headers
    cdef public bytes cors               # CORS response headers for this request (b"": none)
    # the answer of a request refused by route, method or auth:
    # (status, body, content type, headers, error code)
    cdef public tuple refusal
    # request-id candidates, in priority order
    cdef bytes id_x_request_id
    cdef bytes id_x_correlation_id
    cdef bytes id_x_trace_id
    cdef bytes id_request_id
    cdef list custom_ids                 # --request-id-headers: values in the configured order
    cdef list custom_keys                # --routing-key-headers: values in the configured order
    cdef public long long header_bytes
    cdef public int header_count

    cdef int set_header(self, bytes name, bytes value) except -1
    cdef int take_client_id(self) except -1
    cdef int set_custom_id(self, Py_ssize_t index, Py_ssize_t count, bytes value) except -1
    cdef int set_custom_key(self, Py_ssize_t index, Py_ssize_t count, bytes value) except -1
    cdef int take_custom_key(self) except -1
    cdef int add_body(self, bytes data) except -1
    cdef bytes finish_body(self)


cdef bytes make_request_id(bytes prefix)
