"""Stable 64-bit hashes: the same input gives the same value in every
process and on every host, which is what lets independent gateways agree
on where a new prefix goes (see CacheAwarePolicy.place)."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

from smg._fast.text cimport Text


cdef inline uint64_t mix64(uint64_t h) noexcept nogil:
    """splitmix64's finaliser: every input bit flips about half the output bits."""
    h ^= h >> 30
    h *= <uint64_t>0xbf58476d1ce4e5b9ULL
    h ^= h >> 27
    h *= <uint64_t>0x94d049bb133111ebULL
    h ^= h >> 31
    return h


cdef inline uint64_t fnv1a(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= data[i]
        h *= <uint64_t>0x100000001b3ULL
    return mix64(h)


ctypedef fused char_width:
    uint8_t
    uint16_t
    uint32_t


cdef inline uint64_t _fnv1a_chars(const char_width* chars, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <uint64_t>chars[i]
        h *= <uint64_t>0x100000001b3ULL
    return mix64(h)


cdef inline uint64_t hash_text(const Text* text, Py_ssize_t n) noexcept nogil:
    """FNV-1a over the first n code points (one step per character, not per
    byte: the same value whatever width the str stores them in)."""
    if text.kind == 1:
        return _fnv1a_chars(<const uint8_t*>text.data, n)
    if text.kind == 2:
        return _fnv1a_chars(<const uint16_t*>text.data, n)
    return _fnv1a_chars(<const uint32_t*>text.data, n)
