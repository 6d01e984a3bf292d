# cython: language_level=3
"""A request body's JSON, parsed with each string made once.

orjson copies its input before parsing it and then builds Python strings
from that copy, so while it parses a body with a 100 MB prompt the process
holds the body, the copy and the prompt's str: three times the prompt. A
body of LARGE_BODY_BYTES or more is read here instead, straight from the
body's bytes: a string is measured in a first pass (its length in code
points and its widest code point) and written into a str of exactly that
size in a second, so the parse holds the body and what it builds, nothing
more. Anything this reader is not sure of the same way orjson is (a number
out of the 64-bit range, a lone surrogate, nesting deeper than orjson
allows, any syntax error) goes to orjson, which answers for it: the result
and the errors are orjson's either way. Small bodies go to orjson at once:
its copy is small, and it is faster."""

import orjson

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from libc.math cimport isfinite
from libc.stdint cimport uint32_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, uint32_t maxchar)
    void* PyUnicode_DATA(object o)
    int PyUnicode_KIND(object o)
    void PyUnicode_WRITE(int kind, void* data, Py_ssize_t index, uint32_t value)
    int PyUnicode_1BYTE_KIND
    object PyLong_FromLongLong(long long v)
    object PyFloat_FromDouble(double v)
    double PyOS_string_to_double(const char* s, char** endptr, PyObject* overflow_exception) except? -1.0

ctypedef unsigned char uchar

DEF LARGE_BODY_BYTES = 1048576
# orjson refuses nesting deeper than 1024; deeper than this is left to it
DEF MAX_DEPTH = 1000
# an integer of more digits may be out of orjson's 64-bit range: left to it
DEF MAX_INT_DIGITS = 18
# what decode_char answers for anything this reader leaves to orjson
DEF NOT_SURE = 0xFFFFFFFF


class _NotSure(Exception):
    """The body holds something orjson must judge."""


cdef struct Cursor:
    const uchar* p
    const uchar* end
    int depth


cpdef object parse_json(bytes body, Py_ssize_t large=LARGE_BODY_BYTES):
    """orjson.loads(body), holding one copy of each string (see the module's
    note) when the body is `large` bytes or more."""
    cdef Cursor c
    if PyBytes_GET_SIZE(body) < large:
        return orjson.loads(body)
    c.p = <const uchar*>PyBytes_AS_STRING(body)
    c.end = c.p + PyBytes_GET_SIZE(body)
    c.depth = 0
    try:
        value = read_value(&c)
        skip_space(&c)
        if c.p != c.end:
            raise _NotSure()
        return value
    except _NotSure:
        return orjson.loads(body)


cdef inline void skip_space(Cursor* c) noexcept:
    while c.p < c.end and (c.p[0] == 32 or c.p[0] == 10 or c.p[0] == 13 or c.p[0] == 9):
        c.p += 1


cdef object read_value(Cursor* c):
    cdef uchar ch
    skip_space(c)
    if c.p >= c.end:
        raise _NotSure()
    ch = c.p[0]
    if ch == c'"':
        return read_string(c)
    if ch == c'{':
        return read_object(c)
    if ch == c'[':
        return read_array(c)
    if ch == c'-' or (c'0' <= ch <= c'9'):
        return read_number(c)
    if literal(c, b"true", 4):
        return True
    if literal(c, b"false", 5):
        return False
    if literal(c, b"null", 4):
        return None
    raise _NotSure()


cdef inline bint literal(Cursor* c, const char* word, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    if c.end - c.p < n:
        return False
    for i in range(n):
        if c.p[i] != <uchar>word[i]:
            return False
    c.p += n
    return True


cdef bint opens_empty(Cursor* c, uchar close) except -1:
    """At an opening bracket: one level deeper, past it; True (and past
    `close`, back up a level) when the container is empty."""
    c.depth += 1
    if c.depth > MAX_DEPTH:
        raise _NotSure()
    c.p += 1
    skip_space(c)
    if c.p < c.end and c.p[0] == close:
        c.p += 1
        c.depth -= 1
        return True
    return False


cdef bint member_ends(Cursor* c, uchar close) except -1:
    """After a member: past a comma (False, another member follows) or past
    `close` (True, back up a level)."""
    skip_space(c)
    if c.p >= c.end:
        raise _NotSure()
    if c.p[0] == c',':
        c.p += 1
        return False
    if c.p[0] == close:
        c.p += 1
        c.depth -= 1
        return True
    raise _NotSure()


cdef object read_object(Cursor* c):
    cdef dict d = {}
    if opens_empty(c, c'}'):
        return d
    while True:
        skip_space(c)
        if c.p >= c.end or c.p[0] != c'"':
            raise _NotSure()
        key = read_string(c)
        skip_space(c)
        if c.p >= c.end or c.p[0] != c':':
            raise _NotSure()
        c.p += 1
        d[key] = read_value(c)
        if member_ends(c, c'}'):
            return d


cdef object read_array(Cursor* c):
    cdef list items = []
    if opens_empty(c, c']'):
        return items
    while True:
        items.append(read_value(c))
        if member_ends(c, c']'):
            return items


cdef inline bint is_digit(const uchar* p, const uchar* end) noexcept:
    return p < end and c'0' <= p[0] <= c'9'


cdef object read_number(Cursor* c):
    """JSON's number grammar exactly; an integer of up to MAX_INT_DIGITS
    digits, or a finite float (the bytes' NUL terminator stops the C parser)."""
    cdef const uchar* start = c.p
    cdef const uchar* p = c.p
    cdef bint negative = False, fraction = False
    cdef long long value = 0
    cdef Py_ssize_t digits = 0
    cdef double f
    cdef char* stop
    if p[0] == c'-':
        negative = True
        p += 1
    if not is_digit(p, c.end):
        raise _NotSure()
    if p[0] == c'0':
        p += 1
        digits = 1
    else:
        while is_digit(p, c.end):
            if digits < MAX_INT_DIGITS:
                value = value * 10 + (p[0] - c'0')
            digits += 1
            p += 1
    if p < c.end and p[0] == c'.':
        fraction = True
        p += 1
        if not is_digit(p, c.end):
            raise _NotSure()
        while is_digit(p, c.end):
            p += 1
    if p < c.end and (p[0] == c'e' or p[0] == c'E'):
        fraction = True
        p += 1
        if p < c.end and (p[0] == c'+' or p[0] == c'-'):
            p += 1
        if not is_digit(p, c.end):
            raise _NotSure()
        while is_digit(p, c.end):
            p += 1
    c.p = p
    if not fraction:
        if digits > MAX_INT_DIGITS:
            raise _NotSure()
        return PyLong_FromLongLong(-value if negative else value)
    f = PyOS_string_to_double(<const char*>start, &stop, NULL)
    if <const uchar*>stop != p or not isfinite(f):
        raise _NotSure()  # parsed otherwise than the grammar, or out of range
    return PyFloat_FromDouble(f)


cdef inline int hex_value(uchar h) noexcept:
    if c'0' <= h <= c'9':
        return h - c'0'
    if c'a' <= h <= c'f':
        return h - c'a' + 10
    if c'A' <= h <= c'F':
        return h - c'A' + 10
    return -1


cdef inline uint32_t hex4(const uchar* p, const uchar* end) noexcept:
    cdef uint32_t v = 0
    cdef int i, h
    if end - p < 4:
        return NOT_SURE
    for i in range(4):
        h = hex_value(p[i])
        if h < 0:
            return NOT_SURE
        v = v * 16 + <uint32_t>h
    return v


cdef inline uint32_t decode_char(const uchar** at, const uchar* end) noexcept:
    """The code point at *at (an escape or a UTF-8 sequence; not a plain
    ASCII character), moving *at past it; NOT_SURE for anything invalid."""
    cdef const uchar* p = at[0]
    cdef uchar b = p[0], e
    cdef uint32_t cp, low
    cdef Py_ssize_t need, i
    if b == c'\\':
        if end - p < 2:
            return NOT_SURE
        e = p[1]
        at[0] = p + 2
        if e == c'"' or e == c'\\' or e == c'/':
            return e
        if e == c'n':
            return 10
        if e == c't':
            return 9
        if e == c'r':
            return 13
        if e == c'b':
            return 8
        if e == c'f':
            return 12
        if e != c'u':
            return NOT_SURE
        cp = hex4(p + 2, end)
        if cp == NOT_SURE or 0xDC00 <= cp <= 0xDFFF:
            return NOT_SURE
        if 0xD800 <= cp <= 0xDBFF:
            # a surrogate pair, else a lone surrogate (left to orjson)
            if end - p < 12 or p[6] != c'\\' or p[7] != c'u':
                return NOT_SURE
            low = hex4(p + 8, end)
            if low == NOT_SURE or not (0xDC00 <= low <= 0xDFFF):
                return NOT_SURE
            at[0] = p + 12
            return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
        at[0] = p + 6
        return cp
    if b < 0x80:
        return NOT_SURE  # a control character (plain ASCII never comes here)
    if 0xC2 <= b <= 0xDF:
        need = 1
        cp = b & 0x1F
    elif 0xE0 <= b <= 0xEF:
        need = 2
        cp = b & 0x0F
    elif 0xF0 <= b <= 0xF4:
        need = 3
        cp = b & 0x07
    else:
        return NOT_SURE
    if end - p <= need:
        return NOT_SURE
    for i in range(1, need + 1):
        if (p[i] & 0xC0) != 0x80:
            return NOT_SURE
        cp = (cp << 6) | (p[i] & 0x3F)
    # overlong forms, UTF-16 surrogates and code points past U+10FFFF are not UTF-8
    if (need == 2 and (cp < 0x800 or 0xD800 <= cp <= 0xDFFF)) or (need == 3 and not (0x10000 <= cp <= 0x10FFFF)):
        return NOT_SURE
    at[0] = p + need + 1
    return cp


cdef inline bint plain(uchar b) noexcept:
    """A character that stands for itself inside a string: printable ASCII
    other than the quote and the backslash."""
    return 0x20 <= b < 0x80 and b != c'"' and b != c'\\'


cdef object read_string(Cursor* c):
    cdef const uchar* start = c.p + 1
    cdef const uchar* p = start
    cdef const uchar* end = c.end
    cdef const uchar* run
    cdef Py_ssize_t count = 0, i = 0
    cdef uint32_t cp, widest = 0
    cdef bint simple = True
    cdef int kind
    cdef void* data
    # pass 1: the length in code points and the widest one
    while True:
        run = p
        while p < end and plain(p[0]):
            p += 1
        count += p - run
        if p >= end:
            raise _NotSure()
        if p[0] == c'"':
            break
        simple = False
        cp = decode_char(&p, end)
        if cp == NOT_SURE:
            raise _NotSure()
        count += 1
        if cp > widest:
            widest = cp
    c.p = p + 1
    if simple:
        s = PyUnicode_New(count, 127)
        memcpy(PyUnicode_DATA(s), start, count)
        return s
    # pass 2: the characters, into a str of exactly that size
    s = PyUnicode_New(count, widest if widest > 127 else 127)
    kind = PyUnicode_KIND(s)
    data = PyUnicode_DATA(s)
    end = p
    p = start
    while p < end:
        run = p
        while p < end and plain(p[0]):
            p += 1
        if kind == PyUnicode_1BYTE_KIND:
            memcpy(<uchar*>data + i, run, p - run)
            i += p - run
        else:
            while run < p:
                PyUnicode_WRITE(kind, data, i, run[0])
                run += 1
                i += 1
        if p < end:
            PyUnicode_WRITE(kind, data, i, decode_char(&p, end))
            i += 1
    return s
