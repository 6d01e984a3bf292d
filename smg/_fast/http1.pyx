# cython: language_level=3
"""HTTP/1.x response framing for the upstream side of the proxy.

Workers are HTTP/1.1 servers (SGLang and vLLM run uvicorn). The gateway needs
from each response: its status, the header lines it may relay, and where the
body ends, so that the connection can go back to the pool. Body bytes are
never copied in pass-through mode: `feed_body` only walks the framing.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy, memchr
from cpython.mem cimport PyMem_Malloc, PyMem_Free


cdef extern from "string.h" nogil:
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)


class UpstreamProtocolError(ValueError):
    """The worker sent something that is not a valid HTTP/1.x response."""


DEF MAX_HEAD = 65536
DEF MAX_CHUNK_LINE = 4096

cdef inline unsigned char _lower(unsigned char c) noexcept:
    if c >= 65 and c <= 90:
        return c + 32
    return c


cdef inline bint _ieq(const unsigned char* a, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept:
    """a[:n] equals the lowercase literal lit[:m], case-insensitively."""
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(n):
        if _lower(a[i]) != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _has_token(const unsigned char* v, Py_ssize_t n, const char* token, Py_ssize_t m) noexcept:
    """The comma-separated header value v[:n] holds `token` (case-insensitive)."""
    cdef Py_ssize_t i = 0, start, end
    while i < n:
        while i < n and (v[i] == 32 or v[i] == 9 or v[i] == 44):
            i += 1
        start = i
        while i < n and v[i] != 44:
            i += 1
        end = i
        while end > start and (v[end - 1] == 32 or v[end - 1] == 9):
            end -= 1
        if _ieq(v + start, end - start, token, m):
            return True
    return False


cdef inline bint _last_token_is(const unsigned char* v, Py_ssize_t n, const char* token, Py_ssize_t m) noexcept:
    cdef Py_ssize_t end = n, start
    while end > 0 and (v[end - 1] == 32 or v[end - 1] == 9):
        end -= 1
    start = end
    while start > 0 and v[start - 1] != 44:
        start -= 1
    while start < end and (v[start] == 32 or v[start] == 9):
        start += 1
    return _ieq(v + start, end - start, token, m)


cdef class ResponseParser:

    def __cinit__(self):
        self.max_head = MAX_HEAD
        self.reset(False)

    cpdef reset(self, bint head_only=False):
        self.state = P_HEAD
        self.status = 0
        self.reason = b""
        self.chunked = False
        self.keep_alive = True
        self.content_length = -1
        self.forward_headers = b""
        self.content_type = None
        self.http_minor = 1
        self.head_only = head_only
        self.remaining = 0
        self.line_len = 0
        self.head_buf = None

    cpdef bint done(self):
        return self.state == P_DONE

    cpdef bint in_head(self):
        return self.state == P_HEAD

    cpdef bint until_eof(self):
        return self.state == P_UNTIL_EOF

    cpdef bint between_chunks(self):
        """In a chunked body, between two chunks: what was relayed so far ends
        a chunk, so another chunk can follow."""
        return self.state == P_CHUNK_SIZE and self.line_len == 0

    cdef int finish_eof(self) except -1:
        """The connection closed: valid only for a body framed by EOF."""
        if self.state == P_UNTIL_EOF:
            self.state = P_DONE
            return 0
        raise UpstreamProtocolError("connection closed before the response ended")

    cdef Py_ssize_t feed_head(self, bytes data) except -2:
        """Consume head bytes. Returns the offset in `data` where the body
        starts once the head is complete, or -1 when more bytes are needed."""
        cdef const unsigned char* buf
        cdef Py_ssize_t n, base, start, end, body_off
        cdef const unsigned char* hit
        cdef bytes head
        while True:
            if self.head_buf is None:
                buf = <const unsigned char*>PyBytes_AS_STRING(data)
                n = PyBytes_GET_SIZE(data)
                hit = <const unsigned char*>memmem(buf, n, b"\r\n\r\n", 4)
                if hit == NULL:
                    if n > self.max_head:
                        raise UpstreamProtocolError("response head too large")
                    self.head_buf = bytearray(data)
                    return -1
                end = (hit - buf) + 4
                self._parse_head(buf, end)
                body_off = end
            else:
                base = len(self.head_buf)
                start = base - 3 if base >= 3 else 0
                self.head_buf += data
                n = len(self.head_buf)
                head = bytes(self.head_buf)
                buf = <const unsigned char*>PyBytes_AS_STRING(head)
                hit = <const unsigned char*>memmem(buf + start, n - start, b"\r\n\r\n", 4)
                if hit == NULL:
                    if n > self.max_head:
                        raise UpstreamProtocolError("response head too large")
                    return -1
                end = (hit - buf) + 4
                self._parse_head(buf, end)
                self.head_buf = None
                body_off = end - base
            if self.status >= 200 or self.status == 101:
                return body_off
            # an interim 1xx response: skip it and parse the real head
            self.reset(self.head_only)
            data = data[body_off:]
            if not data:
                return -1

    cdef int _parse_head(self, const unsigned char* buf, Py_ssize_t end) except -1:
        cdef char* o = <char*>PyMem_Malloc(end)
        cdef Py_ssize_t on = 0
        if o == NULL:
            raise MemoryError()
        try:
            self._parse_lines(buf, end, o, &on)
            self.forward_headers = PyBytes_FromStringAndSize(o, on)
        finally:
            PyMem_Free(o)
        return 0

    cdef int _parse_lines(self, const unsigned char* buf, Py_ssize_t end, char* o, Py_ssize_t* out_len) except -1:
        cdef Py_ssize_t i, line_start, line_end, colon, vs, ve, p
        cdef const unsigned char* line
        cdef long long cl = -1, v
        cdef bint te_present = False, conn_close = False, conn_keep = False
        cdef Py_ssize_t on = 0
        cdef int status = 0
        # status line: HTTP/1.x SP DDD [SP reason]
        line_end = <Py_ssize_t>(<const unsigned char*>memchr(buf, 13, end) - buf)
        if line_end < 12 or buf[0] != 72 or buf[1] != 84 or buf[2] != 84 or buf[3] != 80 \
                or buf[4] != 47 or buf[5] != 49 or buf[6] != 46 or buf[8] != 32:
            raise UpstreamProtocolError("invalid status line")
        if buf[7] == 48:
            self.http_minor = 0
        elif buf[7] == 49:
            self.http_minor = 1
        else:
            raise UpstreamProtocolError("unsupported HTTP version")
        for i in range(9, 12):
            if buf[i] < 48 or buf[i] > 57:
                raise UpstreamProtocolError("invalid status code")
            status = status * 10 + (buf[i] - 48)
        if status < 100:
            raise UpstreamProtocolError("invalid status code")
        if line_end > 12 and buf[12] != 32:
            raise UpstreamProtocolError("invalid status line")
        self.status = status
        self.reason = PyBytes_FromStringAndSize(<const char*>buf + 13, line_end - 13) if line_end > 13 else b""
        self.keep_alive = self.http_minor == 1
        i = line_end + 2
        while i < end - 2:
            line_start = i
            line = buf + i
            p = <Py_ssize_t>(<const unsigned char*>memchr(line, 13, end - i) - buf)
            line_end = p
            if buf[line_end + 1] != 10:
                raise UpstreamProtocolError("bare CR in response head")
            i = line_end + 2
            if line[0] == 32 or line[0] == 9:
                raise UpstreamProtocolError("obsolete line folding in response head")
            colon = -1
            for p in range(line_start, line_end):
                if buf[p] == 58:
                    colon = p
                    break
                if buf[p] <= 32 or buf[p] >= 127:
                    raise UpstreamProtocolError("invalid header name")
            if colon <= line_start:
                raise UpstreamProtocolError("invalid header line")
            vs = colon + 1
            while vs < line_end and (buf[vs] == 32 or buf[vs] == 9):
                vs += 1
            ve = line_end
            while ve > vs and (buf[ve - 1] == 32 or buf[ve - 1] == 9):
                ve -= 1
            if _ieq(line, colon - line_start, b"content-length", 14):
                if ve == vs:
                    raise UpstreamProtocolError("empty Content-Length")
                v = 0
                for p in range(vs, ve):
                    if buf[p] < 48 or buf[p] > 57 or v > 100000000000000:
                        raise UpstreamProtocolError("invalid Content-Length")
                    v = v * 10 + (buf[p] - 48)
                if cl != -1 and cl != v:
                    raise UpstreamProtocolError("conflicting Content-Length headers")
                cl = v
            elif _ieq(line, colon - line_start, b"transfer-encoding", 17):
                te_present = True
                self.chunked = _last_token_is(buf + vs, ve - vs, b"chunked", 7)
            elif _ieq(line, colon - line_start, b"connection", 10):
                if _has_token(buf + vs, ve - vs, b"close", 5):
                    conn_close = True
                if _has_token(buf + vs, ve - vs, b"keep-alive", 10):
                    conn_keep = True
            elif _ieq(line, colon - line_start, b"keep-alive", 10) \
                    or _ieq(line, colon - line_start, b"proxy-connection", 16) \
                    or _ieq(line, colon - line_start, b"te", 2) \
                    or _ieq(line, colon - line_start, b"trailer", 7) \
                    or _ieq(line, colon - line_start, b"upgrade", 7) \
                    or _ieq(line, colon - line_start, b"x-request-id", 12) \
                    or _ieq(line, colon - line_start, b"x-smg-routed-worker-id", 22) \
                    or _ieq(line, colon - line_start, b"proxy-authenticate", 18):
                pass
            else:
                if _ieq(line, colon - line_start, b"content-type", 12):
                    self.content_type = PyBytes_FromStringAndSize(<const char*>buf + vs, ve - vs)
                memcpy(o + on, line, line_end - line_start + 2)
                on += line_end - line_start + 2
        out_len[0] = on
        if conn_close:
            self.keep_alive = False
        elif conn_keep:
            self.keep_alive = True
        if te_present:
            # Transfer-Encoding overrides Content-Length; a response with both
            # is suspicious enough not to reuse the connection.
            if cl != -1:
                self.keep_alive = False
            cl = -1
        self.content_length = cl
        if self.head_only or status == 204 or status == 304 or (status >= 100 and status < 200):
            self.state = P_DONE
            self.content_length = 0
            self.chunked = False
        elif self.chunked:
            self.state = P_CHUNK_SIZE
            self.remaining = 0
            self.line_len = 0
        elif te_present:
            self.state = P_UNTIL_EOF
            self.keep_alive = False
        elif cl >= 0:
            self.remaining = cl
            self.state = P_DONE if cl == 0 else P_LENGTH
        else:
            self.state = P_UNTIL_EOF
            self.keep_alive = False
        return 0

    cdef Py_ssize_t feed_body(self, const unsigned char* buf, Py_ssize_t n, list decoded) except -2:
        """Walk body bytes; returns how many of the n bytes belong to this
        response (fewer than n only when it ended). With `decoded` given,
        the payload bytes (chunk framing removed) are appended to it."""
        cdef Py_ssize_t i = 0, take
        cdef unsigned char c
        cdef int digit
        if self.state == P_DONE:
            return 0
        while i < n:
            if self.state == P_LENGTH or self.state == P_CHUNK_DATA:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                if decoded is not None and take > 0:
                    decoded.append(PyBytes_FromStringAndSize(<const char*>buf + i, take))
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = P_DONE if self.state == P_LENGTH else P_CHUNK_DATA_CR
                if self.state == P_DONE:
                    return i
                continue
            if self.state == P_UNTIL_EOF:
                if decoded is not None:
                    decoded.append(PyBytes_FromStringAndSize(<const char*>buf + i, n - i))
                return n
            c = buf[i]
            i += 1
            if self.state == P_CHUNK_SIZE:
                if c >= 48 and c <= 57:
                    digit = c - 48
                elif c >= 97 and c <= 102:
                    digit = c - 87
                elif c >= 65 and c <= 70:
                    digit = c - 55
                else:
                    digit = -1
                if digit >= 0:
                    if self.remaining > <long long>0x07FFFFFFFFFFFFFFLL:
                        raise UpstreamProtocolError("chunk size too large")
                    self.remaining = self.remaining * 16 + digit
                    self.line_len += 1
                elif self.line_len == 0:
                    raise UpstreamProtocolError("invalid chunk size")
                elif c == 13:
                    self.state = P_CHUNK_SIZE_LF
                elif c == 59 or c == 32 or c == 9:
                    self.state = P_CHUNK_EXT
                else:
                    raise UpstreamProtocolError("invalid chunk size")
            elif self.state == P_CHUNK_EXT:
                self.line_len += 1
                if self.line_len > MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("chunk extension too long")
                if c == 13:
                    self.state = P_CHUNK_SIZE_LF
                elif c == 10:
                    raise UpstreamProtocolError("bare LF in chunk size line")
            elif self.state == P_CHUNK_SIZE_LF:
                if c != 10:
                    raise UpstreamProtocolError("invalid chunk size line ending")
                self.line_len = 0
                if self.remaining == 0:
                    self.state = P_TRAILER_START
                else:
                    self.state = P_CHUNK_DATA
            elif self.state == P_CHUNK_DATA_CR:
                if c != 13:
                    raise UpstreamProtocolError("chunk data not followed by CRLF")
                self.state = P_CHUNK_DATA_LF
            elif self.state == P_CHUNK_DATA_LF:
                if c != 10:
                    raise UpstreamProtocolError("chunk data not followed by CRLF")
                self.state = P_CHUNK_SIZE
                self.remaining = 0
                self.line_len = 0
            elif self.state == P_TRAILER_START:
                if c == 13:
                    self.state = P_TRAILER_LF
                    self.line_len = 0
                else:
                    self.state = P_TRAILER_LINE
                    self.line_len = 1
            elif self.state == P_TRAILER_LINE:
                self.line_len += 1
                if self.line_len > MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("trailer line too long")
                if c == 13:
                    self.state = P_TRAILER_LF
            elif self.state == P_TRAILER_LF:
                if c != 10:
                    raise UpstreamProtocolError("invalid trailer line ending")
                if self.line_len == 0:
                    self.state = P_DONE
                    return i
                self.state = P_TRAILER_START
                self.line_len = 0
            elif self.state == P_DONE:
                return i - 1
            else:
                raise UpstreamProtocolError("parser in an invalid state")
        return i

    # Python-facing helpers, for tests and fuzzing.
    def feed(self, bytes data, bint decode=False):
        """Feed bytes; returns (head_complete, body_bytes_consumed, decoded_parts)."""
        cdef Py_ssize_t off = 0, used
        cdef list parts = [] if decode else None
        if self.state == P_HEAD:
            off = self.feed_head(data)
            if off < 0:
                return False, 0, parts
        used = self.feed_body(<const unsigned char*>PyBytes_AS_STRING(data) + off,
                              PyBytes_GET_SIZE(data) - off, parts)
        return True, used, parts

