# cython: language_level=3
"""A client's request as the server parses it: the headers the gateway
uses, sorted into slots with one dict lookup each, the body, and request
ids (the client's when it sent a usable one, else made here)."""

import os

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_DECREF, Py_XDECREF
from libc.string cimport memcpy


cdef extern from *:
    """
    #ifdef __GLIBC__
    #include <malloc.h>
    static int smg_map_large_allocations(int threshold) { return mallopt(M_MMAP_THRESHOLD, threshold); }
    static int smg_release_free_memory(void) { return malloc_trim(0); }
    #else
    static int smg_map_large_allocations(int threshold) { (void)threshold; return 0; }
    static int smg_release_free_memory(void) { return 0; }
    #endif
    """
    int smg_map_large_allocations(int threshold)
    int smg_release_free_memory()


def map_large_allocations(int threshold=1 << 20):
    """Allocations of `threshold` bytes or more (request bodies, long
    prompts) get their own mappings, given back to the system when freed.
    Without a fixed threshold glibc raises it after freeing such a block
    (up to 32 MB), so the next large bodies come from the heap, where what
    they leave behind stays in the process after the requests end. Returns
    whether the allocator took the setting (glibc)."""
    return smg_map_large_allocations(threshold) == 1


def release_free_memory():
    """Give the system back the heap's free pages (glibc's malloc_trim):
    what a burst of requests left behind in the heap, below the mmap
    threshold, once the burst is over. Returns whether any were given back."""
    return smg_release_free_memory() == 1


# header slots: lowercase name -> slot; common spellings pre-seeded so most
# headers need one dict lookup and no lower()
DEF H_IGNORE = 0
DEF H_AUTHORIZATION = 1
DEF H_TRACEPARENT = 2
DEF H_TRACESTATE = 3
DEF H_ROUTING_KEY = 4
DEF H_FORWARDED_FOR = 5
DEF H_CONTENT_TYPE = 6
DEF H_CONTENT_LENGTH = 7
DEF H_EXPECT = 8
DEF H_CONNECTION = 9
DEF H_ID0 = 10   # x-request-id
DEF H_ID1 = 11   # x-correlation-id
DEF H_ID2 = 12   # x-trace-id
DEF H_ID3 = 13   # request-id
DEF H_TRANSFER_ENCODING = 14
DEF H_ORIGIN = 15
DEF H_CORS_METHOD = 16
DEF H_CORS_HEADERS = 17
DEF H_X_API_KEY = 18

cdef dict _SLOTS = {}


cdef _seed_slots():
    names = {
        "authorization": H_AUTHORIZATION, "traceparent": H_TRACEPARENT, "tracestate": H_TRACESTATE,
        "x-smg-routing-key": H_ROUTING_KEY, "x-forwarded-for": H_FORWARDED_FOR,
        "content-type": H_CONTENT_TYPE, "content-length": H_CONTENT_LENGTH, "expect": H_EXPECT,
        "connection": H_CONNECTION, "x-request-id": H_ID0, "x-correlation-id": H_ID1,
        "x-trace-id": H_ID2, "request-id": H_ID3, "transfer-encoding": H_TRANSFER_ENCODING,
        "origin": H_ORIGIN, "access-control-request-method": H_CORS_METHOD,
        "access-control-request-headers": H_CORS_HEADERS, "x-api-key": H_X_API_KEY,
        "host": H_IGNORE, "user-agent": H_IGNORE, "accept": H_IGNORE, "accept-encoding": H_IGNORE,
        "accept-language": H_IGNORE, "referer": H_IGNORE, "cookie": H_IGNORE,
        "cache-control": H_IGNORE, "pragma": H_IGNORE, "te": H_IGNORE, "keep-alive": H_IGNORE,
    }
    for name, slot in names.items():
        for spelling in (name, name.title(), name.upper()):
            _SLOTS[spelling.encode()] = slot
    _SLOTS[b"X-Request-ID"] = H_ID0
    _SLOTS[b"X-Request-Id"] = H_ID0
    _SLOTS[b"X-SMG-Routing-Key"] = H_ROUTING_KEY
    _SLOTS[b"Content-type"] = H_CONTENT_TYPE

_seed_slots()


# --- request ids ---------------------------------------------------------

cdef bytes _ALNUM = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
cdef unsigned long long _id_counter = 0
cdef char _id_base[12]


cdef _seed_ids():
    cdef bytes raw = os.urandom(12)
    for i in range(12):
        _id_base[i] = _ALNUM[raw[i] % 62]

_seed_ids()


cdef bytes make_request_id(bytes prefix):
    """prefix + 24 characters: 12 random per process, 12 from a counter."""
    global _id_counter
    cdef Py_ssize_t plen = len(prefix)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, plen + 24)
    cdef char* p = PyBytes_AS_STRING(out)
    cdef unsigned long long c
    cdef int i
    _id_counter += 1
    # an odd multiplier is a bijection on 64-bit integers: unique, not sequential-looking
    c = _id_counter * <unsigned long long>11400714819323198485ULL
    for i in range(plen):
        p[i] = prefix[i]
    for i in range(12):
        p[plen + i] = _id_base[i]
    for i in range(11, -1, -1):
        p[plen + 12 + i] = _ALNUM[c % 62]
        c //= 62
    return out


# A client's request id is echoed and forwarded: a longer one, or one with
# characters outside printable ASCII, is ignored and the gateway makes one.
DEF MAX_REQUEST_ID = 128


cdef inline bint valid_request_id(bytes value):
    cdef Py_ssize_t i, n
    cdef const unsigned char* p
    if value is None:
        return False
    n = PyBytes_GET_SIZE(value)
    if n == 0 or n > MAX_REQUEST_ID:
        return False
    p = <const unsigned char*>PyBytes_AS_STRING(value)
    for i in range(n):
        if p[i] < 0x21 or p[i] > 0x7e:
            return False
    return True


cdef list _note_choice(list values, Py_ssize_t index, Py_ssize_t count, bytes value):
    """The values of `count` configured headers, in their order: `value` goes
    to `index` unless the header came before (the first one counts)."""
    if values is None:
        values = [None] * count
    if values[index] is None:
        values[index] = value
    return values


cdef bytes _first_valid(list values):
    """The first of `values` usable as an id or key (see valid_request_id)."""
    if values is not None:
        for value in values:
            if valid_request_id(value):
                return value
    return None


cdef class Request:

    def __cinit__(self):
        self.url = b""
        self.method = b"GET"
        self.path = ""
        self.query = b""
        self.body = b""
        self.body_buf = NULL
        self.body_len = 0
        self.keep_alive = True
        self.http_minor = 1
        self.header_bytes = 0
        self.header_count = 0
        self.cors = b""

    cdef int set_header(self, bytes name, bytes value) except -1:
        cdef int slot
        found = _SLOTS.get(name)
        if found is None:
            found = _SLOTS.get(name.lower(), H_IGNORE)
        slot = <int>found
        if slot == H_IGNORE:
            return 0
        if slot == H_AUTHORIZATION:
            self.authorization = value
        elif slot == H_CONTENT_TYPE:
            self.content_type = value
        elif slot == H_CONTENT_LENGTH:
            self.content_length = value
        elif slot == H_ID0:
            if value and self.id_x_request_id is None:
                self.id_x_request_id = value
        elif slot == H_ID1:
            if value and self.id_x_correlation_id is None:
                self.id_x_correlation_id = value
        elif slot == H_ID2:
            if value and self.id_x_trace_id is None:
                self.id_x_trace_id = value
        elif slot == H_ID3:
            if value and self.id_request_id is None:
                self.id_request_id = value
        elif slot == H_TRACEPARENT:
            self.traceparent = value
        elif slot == H_TRACESTATE:
            self.tracestate = value
        elif slot == H_ROUTING_KEY:
            self.routing_key = value
        elif slot == H_FORWARDED_FOR:
            self.forwarded_for = value
        elif slot == H_EXPECT:
            self.expect = value
        elif slot == H_CONNECTION:
            self.connection = value
        elif slot == H_TRANSFER_ENCODING:
            self.chunked = True
        elif slot == H_ORIGIN:
            self.origin = value
        elif slot == H_CORS_METHOD:
            self.cors_method = value
        elif slot == H_CORS_HEADERS:
            self.cors_headers = value
        elif slot == H_X_API_KEY:
            self.x_api_key = value
        return 0

    cdef int set_custom_id(self, Py_ssize_t index, Py_ssize_t count, bytes value) except -1:
        """The value of the index-th of --request-id-headers (of `count`)."""
        self.custom_ids = _note_choice(self.custom_ids, index, count, value)
        return 0

    cdef int set_custom_key(self, Py_ssize_t index, Py_ssize_t count, bytes value) except -1:
        """The value of the index-th of --routing-key-headers (of `count`)."""
        self.custom_keys = _note_choice(self.custom_keys, index, count, value)
        return 0

    cdef int take_custom_key(self) except -1:
        """--routing-key-headers: the routing key is the first usable value
        (1 to 128 visible ASCII characters) of the configured headers, else none."""
        self.routing_key = _first_valid(self.custom_keys)
        return 0

    cdef int take_client_id(self) except -1:
        """The client's request id: the first usable value of
        --request-id-headers when they are set, else of x-request-id,
        x-correlation-id, x-trace-id, request-id."""
        if self.custom_ids is not None:
            self.request_id = _first_valid(self.custom_ids)
        elif valid_request_id(self.id_x_request_id):
            self.request_id = self.id_x_request_id
        elif valid_request_id(self.id_x_correlation_id):
            self.request_id = self.id_x_correlation_id
        elif valid_request_id(self.id_x_trace_id):
            self.request_id = self.id_x_trace_id
        elif valid_request_id(self.id_request_id):
            self.request_id = self.id_request_id
        self.id_from_client = self.request_id is not None
        return 0

    def __dealloc__(self):
        Py_XDECREF(self.body_buf)

    cdef int add_body(self, bytes data) except -1:
        """A part of the body as the parser hands it over. One part is kept
        as it is; from the second, the parts are copied into one buffer
        that grows in place (a large buffer is its own mapping, and growing
        it remaps pages instead of copying them), so a body costs about its
        own size: no list of parts joined into a second copy at the end."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t fill = self.body_len
        cdef Py_ssize_t capacity
        if n == 0:
            return 0
        if fill == 0:
            self.body = data
            self.body_len = n
            return 0
        if self.body_buf == NULL:
            first = self.body
            buf = PyBytes_FromStringAndSize(NULL, 2 * (fill + n))
            Py_INCREF(buf)  # the reference body_buf holds
            self.body_buf = <PyObject*>buf
            buf = None
            memcpy(PyBytes_AS_STRING(<object>self.body_buf), PyBytes_AS_STRING(first), fill)
            self.body = b""
            first = None
        capacity = PyBytes_GET_SIZE(<object>self.body_buf)
        if fill + n > capacity:
            _PyBytes_Resize(&self.body_buf, max(2 * capacity, fill + n))
        memcpy(PyBytes_AS_STRING(<object>self.body_buf) + fill, PyBytes_AS_STRING(data), n)
        self.body_len = fill + n
        return 0

    cdef bytes finish_body(self):
        """The whole body (what has arrived, for a body streamed from here)."""
        cdef PyObject* buf = self.body_buf
        if buf != NULL:
            self.body_buf = NULL
            if PyBytes_GET_SIZE(<object>buf) != self.body_len:
                _PyBytes_Resize(&buf, self.body_len)
            self.body = <object>buf
            Py_DECREF(<object>buf)
        return self.body

    def __repr__(self):
        return f"<Request {self.method.decode()} {self.path}>"
