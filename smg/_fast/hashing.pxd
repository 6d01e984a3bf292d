"""Stable 64-bit hashes: the same input gives the same value in every
process and on every host, which is what lets independent gateways agree
on where a new prefix goes (see CacheAwarePolicy.place)."""

from libc.stdint cimport uint64_t


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


cdef inline uint64_t hash_code_points(const Py_UCS4* text, Py_ssize_t n) noexcept nogil:
    """FNV-1a over code points (one step per character, not per byte)."""
    cdef uint64_t h = <uint64_t>0xcbf29ce484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <uint64_t>text[i]
        h *= <uint64_t>0x100000001b3ULL
    return mix64(h)
