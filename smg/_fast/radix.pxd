from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t

cdef enum:
    # RadixTree.insert modes
    INSERT_HIT = 0      # the worker was sent this prompt: one more hit on each node
    INSERT_LEAD = 1     # a prefix handed over: the worker leads every node on the path
    INSERT_WEAK = 2     # the worker holds these nodes too, without a claim on their traffic

from smg._fast.text cimport Text, ucs4


cdef struct Owner:
    int32_t slot        # worker slot (CacheAwarePolicy maps slots to workers)
    uint32_t hits       # requests this worker was given along this node
    double last         # last time it was given one


cdef struct Node:
    void* label         # edge label: 1, 2 or 4 bytes per character (see `kind`)
    int32_t length
    uint8_t kind
    Node* parent
    ucs4* child_keys    # first character of each child, sorted
    Node** children
    int32_t nchildren
    int32_t child_cap
    Owner* owners
    int32_t nowners
    int32_t owner_cap
    double last_access  # newest `last` of its owners


cdef class RadixTree:
    """A radix tree over the characters (Unicode code points) of prompts,
    with per-worker ownership and last-access times on every node."""
    cdef Node* root
    cdef public int64_t total_chars
    cdef public int64_t node_count
    cdef int64_t* slot_chars        # characters owned per worker slot
    cdef int32_t slot_cap

    cdef Py_ssize_t match(self, const Text* text, Py_ssize_t n, Node** best, Py_ssize_t* best_depth) noexcept
    cdef int insert(self, const Text* text, Py_ssize_t n, int32_t slot, double now, int mode=*) except -1
    cdef int insert_matched(self, const Text* text, Py_ssize_t n, Node* best, Py_ssize_t matched, int32_t slot,
                            double now, int mode=*) except -1
    cdef int _add_leaf(self, Node* parent, int32_t at, const Text* text, Py_ssize_t start, Py_ssize_t end,
                       int32_t slot, double now, int mode) except -1
    cdef int _own(self, Node* node, int32_t slot, double now, int mode) except -1
    cdef int remove_slot(self, int32_t slot) except -1
    cdef int hand_over(self, const Text* text, Py_ssize_t n, int32_t from_slot, int32_t to_slot, double now) except -1
    cdef int _move_owner(self, Node* node, int32_t from_slot, int32_t to_slot) except -1
    cdef int64_t evict_to(self, int64_t max_chars) except -1
    cdef int _ensure_slot(self, int32_t slot) except -1
    cdef int _split(self, Node* parent, int32_t index, Py_ssize_t at) except -1
    cdef int _drop_node(self, Node* node) except -1
    cdef int _remove_slot_under(self, Node* node, int32_t slot) except -1
    cdef int _drop_subtree(self, Node* node) except -1
    cdef void _collect_leaves(self, Node* node, Node** heap, Py_ssize_t* size) noexcept
    cdef object _dump(self, Node* node)


cdef inline Py_ssize_t node_end(const Node* node) noexcept:
    """Characters from the root to the end of node's label."""
    cdef Py_ssize_t total = 0
    while node != NULL:
        total += node.length
        node = node.parent
    return total
