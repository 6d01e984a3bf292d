cdef enum:
    # where ResponseParser is in a response
    P_HEAD = 0
    P_LENGTH = 1         # body with a Content-Length
    P_CHUNK_SIZE = 2     # reading a chunk-size line (hex digits)
    P_CHUNK_EXT = 3      # after ';' on a chunk-size line
    P_CHUNK_SIZE_LF = 4  # saw CR after the size line
    P_CHUNK_DATA = 5
    P_CHUNK_DATA_CR = 6
    P_CHUNK_DATA_LF = 7
    P_TRAILER_START = 8  # start of a trailer line (or the final CRLF)
    P_TRAILER_LINE = 9
    P_TRAILER_LF = 10
    P_UNTIL_EOF = 11     # no framing: the body ends when the connection does
    P_DONE = 12


cdef class ResponseParser:
    """Incremental parser for one HTTP/1.x response from a worker.

    It finds the end of the head and of the body without copying the body:
    body bytes are handed back as the caller's own buffer ranges, so a
    proxy can relay them unchanged (chunk framing included) or, with
    `decode`, collect the chunk payloads alone."""

    cdef public int status
    cdef public bytes reason
    cdef public bint chunked
    cdef public bint keep_alive
    cdef public long long content_length   # -1 when absent
    cdef public bytes forward_headers      # header lines safe to relay ("Name: v\r\n"...)
    cdef public bytes content_type
    cdef public int http_minor
    cdef public bint head_only             # the request was HEAD: no body follows
    cdef int state
    cdef long long remaining               # bytes left in the body or the current chunk
    cdef int line_len                      # length of the current size/trailer line
    cdef bytearray head_buf
    cdef Py_ssize_t max_head

    cpdef reset(self, bint head_only=*)
    cdef Py_ssize_t feed_head(self, bytes data) except -2
    cdef Py_ssize_t feed_body(self, const unsigned char* buf, Py_ssize_t n, list decoded) except -2
    cpdef bint done(self)
    cpdef bint in_head(self)
    cpdef bint until_eof(self)
    cpdef bint between_chunks(self)
    cdef int finish_eof(self) except -1
    cdef int _parse_head(self, const unsigned char* buf, Py_ssize_t end) except -1
    cdef int _parse_lines(self, const unsigned char* buf, Py_ssize_t end, char* o, Py_ssize_t* out_len) except -1
