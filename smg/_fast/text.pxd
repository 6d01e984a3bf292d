"""A view of a Python str's characters in the str's own storage (1, 2 or 4
bytes per code point, whichever the str uses): the radix tree and the
prefix hashes read prompts through it, so a prompt is never copied to be
routed. The str must outlive the view."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from cpython.unicode cimport PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND

ctypedef Py_UCS4 ucs4


cdef struct Text:
    const void* data
    Py_ssize_t length
    int kind            # bytes per character: 1, 2 or 4


cdef inline Text text_view(str s, Py_ssize_t n):
    """The first n characters of s (all of them if n < 0 or s is shorter)."""
    cdef Text t
    cdef Py_ssize_t length = PyUnicode_GET_LENGTH(s)
    t.data = PyUnicode_DATA(s)
    t.kind = <int>PyUnicode_KIND(s)
    t.length = n if 0 <= n < length else length
    return t


cdef inline ucs4 char_at(const Text* t, Py_ssize_t i) noexcept nogil:
    if t.kind == 1:
        return (<const uint8_t*>t.data)[i]
    if t.kind == 2:
        return (<const uint16_t*>t.data)[i]
    return (<const uint32_t*>t.data)[i]
