# cython: language_level=3
"""The cache-aware routing tree: a radix tree over prompt characters
(Unicode code points, not bytes), built from C structures.

Each node is an edge label plus the workers ("owners", by slot number) that
were sent a prompt running through it, with a hit count and a last-access
time per owner. Ownership is prefix-closed: inserting a prompt for a worker
marks every node on its path. The tree's size is the number of characters
in all its labels (shared by all workers), kept under a budget by evicting
least-recently-used leaves."""

from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memmove, memset
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from smg._fast.clock cimport monotonic
from smg._fast.text cimport Text, char_at, text_view


# --- labels ---------------------------------------------------------------

cdef inline ucs4 label_at(const Node* node, Py_ssize_t i) noexcept nogil:
    if node.kind == 1:
        return (<const uint8_t*>node.label)[i]
    if node.kind == 2:
        return (<const uint16_t*>node.label)[i]
    return (<const ucs4*>node.label)[i]


DEF BLOCK = 16

ctypedef fused label_char:
    uint8_t
    uint16_t
    uint32_t

ctypedef fused text_char:
    uint8_t
    uint16_t
    uint32_t


cdef inline Py_ssize_t _common(const label_char* label, const text_char* t, Py_ssize_t m) noexcept nogil:
    """Whole blocks of BLOCK characters are compared first, with no branch
    inside a block (the compiler vectorises it): long prompts match mostly
    in long labels."""
    cdef Py_ssize_t i = 0
    cdef int k
    cdef uint32_t diff
    while i + BLOCK <= m:
        diff = 0
        for k in range(BLOCK):
            diff |= <uint32_t>label[i + k] ^ <uint32_t>t[i + k]
        if diff:
            break
        i += BLOCK
    while i < m and <uint32_t>label[i] == <uint32_t>t[i]:
        i += 1
    return i


cdef inline Py_ssize_t _common_with(const label_char* label, const Text* t, Py_ssize_t pos, Py_ssize_t m) noexcept nogil:
    if t.kind == 1:
        return _common(label, (<const uint8_t*>t.data) + pos, m)
    if t.kind == 2:
        return _common(label, (<const uint16_t*>t.data) + pos, m)
    return _common(label, (<const uint32_t*>t.data) + pos, m)


cdef inline Py_ssize_t common_prefix(const Node* node, const Text* t, Py_ssize_t pos, Py_ssize_t n) noexcept nogil:
    """Leading characters node's label and t[pos:n] share."""
    cdef Py_ssize_t m = node.length if node.length < n - pos else n - pos
    if node.kind == 1:
        return _common_with(<const uint8_t*>node.label, t, pos, m)
    if node.kind == 2:
        return _common_with(<const uint16_t*>node.label, t, pos, m)
    return _common_with(<const uint32_t*>node.label, t, pos, m)


cdef inline ucs4 _top(const text_char* chars, Py_ssize_t n) noexcept nogil:
    cdef ucs4 top = 0
    cdef Py_ssize_t i
    for i in range(n):
        if chars[i] > top:
            top = chars[i]
    return top


cdef inline void _narrow(const text_char* chars, label_char* out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = <label_char>chars[i]


cdef int set_label(Node* node, const Text* t, Py_ssize_t start, Py_ssize_t end) except -1:
    """Label `node` with t[start:end], in the narrowest width that holds it
    (a str is only as wide as its widest character: a slice may be narrower)."""
    cdef Py_ssize_t n = end - start
    cdef ucs4 top
    cdef int kind = t.kind
    cdef const char* src = (<const char*>t.data) + start * t.kind
    cdef void* buf
    if kind == 2:
        top = _top(<const uint16_t*>src, n)
        if top < 256:
            kind = 1
    elif kind == 4:
        top = _top(<const uint32_t*>src, n)
        if top < 256:
            kind = 1
        elif top < 65536:
            kind = 2
    buf = malloc(n * kind if n else 1)
    if buf == NULL:
        raise MemoryError()
    if kind == t.kind:
        memcpy(buf, src, n * kind)
    elif t.kind == 2:
        _narrow(<const uint16_t*>src, <uint8_t*>buf, n)
    elif kind == 1:
        _narrow(<const uint32_t*>src, <uint8_t*>buf, n)
    else:
        _narrow(<const uint32_t*>src, <uint16_t*>buf, n)
    node.kind = kind
    node.label = buf
    node.length = <int32_t>n
    return 0


cdef Node* new_node(Node* parent) except NULL:
    cdef Node* node = <Node*>malloc(sizeof(Node))
    if node == NULL:
        raise MemoryError()
    memset(node, 0, sizeof(Node))
    node.parent = parent
    node.kind = 1
    return node


cdef void free_subtree(Node* node) noexcept:
    cdef int32_t i
    for i in range(node.nchildren):
        free_subtree(node.children[i])
    free(node.label)
    free(node.child_keys)
    free(node.children)
    free(node.owners)
    free(node)


# --- children: sorted by first character ---------------------------------

cdef inline int32_t child_index(const Node* node, ucs4 key) noexcept nogil:
    """Index of the child whose label starts with `key`, or -(insertion point) - 1."""
    cdef int32_t lo = 0, hi = node.nchildren, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if node.child_keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    if lo < node.nchildren and node.child_keys[lo] == key:
        return lo
    return -lo - 1


cdef int add_child(Node* node, Node* child, int32_t at) except -1:
    cdef int32_t cap
    if node.nchildren == node.child_cap:
        cap = node.child_cap * 2 if node.child_cap else 2
        node.child_keys = <ucs4*>realloc(node.child_keys, cap * sizeof(ucs4))
        node.children = <Node**>realloc(node.children, cap * sizeof(Node*))
        if node.child_keys == NULL or node.children == NULL:
            raise MemoryError()
        node.child_cap = cap
    memmove(node.child_keys + at + 1, node.child_keys + at, (node.nchildren - at) * sizeof(ucs4))
    memmove(node.children + at + 1, node.children + at, (node.nchildren - at) * sizeof(Node*))
    node.child_keys[at] = label_at(child, 0)
    node.children[at] = child
    node.nchildren += 1
    child.parent = node
    return 0


cdef void remove_child(Node* node, Node* child) noexcept:
    cdef int32_t i = child_index(node, label_at(child, 0))
    if i < 0 or node.children[i] != child:
        return
    memmove(node.child_keys + i, node.child_keys + i + 1, (node.nchildren - i - 1) * sizeof(ucs4))
    memmove(node.children + i, node.children + i + 1, (node.nchildren - i - 1) * sizeof(Node*))
    node.nchildren -= 1


# --- owners -----------------------------------------------------------------

cdef inline int32_t owner_index(const Node* node, int32_t slot) noexcept nogil:
    cdef int32_t i
    for i in range(node.nowners):
        if node.owners[i].slot == slot:
            return i
    return -1


cdef int add_owner(Node* node, int32_t slot, uint32_t hits, double last) except -1:
    cdef int32_t cap
    if node.nowners == node.owner_cap:
        cap = node.owner_cap * 2 if node.owner_cap else 2
        node.owners = <Owner*>realloc(node.owners, cap * sizeof(Owner))
        if node.owners == NULL:
            raise MemoryError()
        node.owner_cap = cap
    node.owners[node.nowners].slot = slot
    node.owners[node.nowners].hits = hits
    node.owners[node.nowners].last = last
    node.nowners += 1
    return 0


cdef inline uint32_t max_hits(const Node* node) noexcept nogil:
    cdef uint32_t top = 0
    cdef int32_t i
    for i in range(node.nowners):
        if node.owners[i].hits > top:
            top = node.owners[i].hits
    return top


cdef inline void remove_owner_at(Node* node, int32_t j) noexcept nogil:
    """Drop owner j, keeping the others in arrival order (ties go to the incumbent)."""
    memmove(node.owners + j, node.owners + j + 1, (node.nowners - j - 1) * sizeof(Owner))
    node.nowners -= 1


# --- eviction heap (oldest leaf first) --------------------------------------

cdef void heap_push(Node** heap, Py_ssize_t* size, Node* node) noexcept:
    cdef Py_ssize_t i = size[0], parent
    size[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent].last_access <= node.last_access:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = node


cdef Node* heap_pop(Node** heap, Py_ssize_t* size) noexcept:
    cdef Node* top = heap[0]
    cdef Node* last
    cdef Py_ssize_t i = 0, child, n
    size[0] -= 1
    n = size[0]
    if n == 0:
        return top
    last = heap[n]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and heap[child + 1].last_access < heap[child].last_access:
            child += 1
        if heap[child].last_access >= last.last_access:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top


cdef class RadixTree:

    def __cinit__(self):
        self.root = new_node(NULL)
        self.total_chars = 0
        self.node_count = 0
        self.slot_chars = NULL
        self.slot_cap = 0

    def __dealloc__(self):
        if self.root != NULL:
            free_subtree(self.root)
        free(self.slot_chars)

    cdef int _ensure_slot(self, int32_t slot) except -1:
        cdef int32_t cap
        if slot < self.slot_cap:
            return 0
        cap = max(slot + 1, self.slot_cap * 2, 16)
        self.slot_chars = <int64_t*>realloc(self.slot_chars, cap * sizeof(int64_t))
        if self.slot_chars == NULL:
            raise MemoryError()
        memset(self.slot_chars + self.slot_cap, 0, (cap - self.slot_cap) * sizeof(int64_t))
        self.slot_cap = cap
        return 0

    cdef Py_ssize_t match(self, const Text* text, Py_ssize_t n, Node** best, Py_ssize_t* best_depth) noexcept:
        """Characters of text[:n] found in the tree. `best` is the deepest node
        the match reached (its owners hold the matched characters; it may be
        matched only in part), `best_depth` the characters matched up to and
        within it, which is the return value."""
        cdef Node* node = self.root
        cdef Node* child
        cdef Node* deepest = NULL
        cdef Py_ssize_t pos = 0, common
        cdef int32_t i
        while pos < n:
            i = child_index(node, char_at(text, pos))
            if i < 0:
                break
            child = node.children[i]
            common = common_prefix(child, text, pos, n)
            pos += common
            deepest = child
            if common < child.length:
                break
            node = child
        best[0] = deepest
        best_depth[0] = pos
        return pos

    cdef int insert(self, const Text* text, Py_ssize_t n, int32_t slot, double now, int mode=INSERT_HIT) except -1:
        """Record that text[:n] was sent to `slot` (see the INSERT_* modes).
        Every node on the path is owned by the slot afterwards."""
        cdef Node* node = self.root
        cdef Node* child
        cdef Py_ssize_t pos = 0, common
        cdef int32_t i
        self._ensure_slot(slot)
        while pos < n:
            i = child_index(node, char_at(text, pos))
            if i < 0:
                self._add_leaf(node, -i - 1, text, pos, n, slot, now, mode)
                return 0
            child = node.children[i]
            common = common_prefix(child, text, pos, n)
            if common < child.length:
                self._split(node, i, common)
                child = node.children[i]
            # child's label is now a prefix of text[pos:]
            self._own(child, slot, now, mode)
            pos += child.length
            node = child
        return 0

    cdef int insert_matched(self, const Text* text, Py_ssize_t n, Node* best, Py_ssize_t matched, int32_t slot,
                            double now, int mode=INSERT_HIT) except -1:
        """insert(text, n, ...) for a text that match() just walked, with its
        result (best, matched): the same tree afterwards, without comparing
        the matched characters a second time (a long prompt's match is most
        of its cost)."""
        cdef Node* node
        cdef Node* parent
        cdef Py_ssize_t end
        cdef int32_t i
        if best == NULL or matched <= 0 or matched > n:
            return self.insert(text, n, slot, now, mode)
        self._ensure_slot(slot)
        end = node_end(best)
        if matched < end:
            # the match ended inside best's label: split it there
            parent = best.parent
            i = child_index(parent, label_at(best, 0))
            self._split(parent, i, best.length - (end - matched))
            best = parent.children[i]
        node = best
        while node != self.root:
            self._own(node, slot, now, mode)
            node = node.parent
        if matched < n:
            i = child_index(best, char_at(text, matched))
            self._add_leaf(best, -i - 1, text, matched, n, slot, now, mode)
        return 0

    cdef int _add_leaf(self, Node* parent, int32_t at, const Text* text, Py_ssize_t start, Py_ssize_t end,
                       int32_t slot, double now, int mode) except -1:
        """A new child of parent, at index `at`, labelled text[start:end]."""
        cdef Node* child = new_node(parent)
        set_label(child, text, start, end)
        add_child(parent, child, at)
        add_owner(child, slot, 0 if mode == INSERT_WEAK else 1, now)
        child.last_access = now
        self.total_chars += child.length
        self.slot_chars[slot] += child.length
        self.node_count += 1
        return 0

    cdef int _own(self, Node* node, int32_t slot, double now, int mode) except -1:
        """`slot` owns `node` (one more hit on it, unless weak)."""
        cdef int32_t j = owner_index(node, slot)
        if j < 0:
            add_owner(node, slot, 0 if mode == INSERT_WEAK else 1, now)
            self.slot_chars[slot] += node.length
            j = node.nowners - 1
        elif mode != INSERT_WEAK:
            node.owners[j].hits += 1
            node.owners[j].last = now
        if mode == INSERT_LEAD:
            node.owners[j].hits = max_hits(node) + 1
        node.last_access = now
        return 0

    cdef int _split(self, Node* parent, int32_t index, Py_ssize_t at) except -1:
        """Split parent's child `index` after `at` characters: a new node with
        the first `at` characters takes its place, with the same owners."""
        cdef Node* child = parent.children[index]
        cdef Node* mid = new_node(parent)
        cdef size_t width = child.kind
        cdef void* rest
        cdef int32_t k
        mid.label = malloc(at * width if at else 1)
        if mid.label == NULL:
            raise MemoryError()
        memcpy(mid.label, child.label, at * width)
        mid.kind = child.kind
        mid.length = <int32_t>at
        rest = malloc((child.length - at) * width)
        if rest == NULL:
            raise MemoryError()
        memcpy(rest, (<char*>child.label) + at * width, (child.length - at) * width)
        free(child.label)
        child.label = rest
        child.length -= <int32_t>at
        mid.owners = <Owner*>malloc(child.nowners * sizeof(Owner)) if child.nowners else NULL
        if child.nowners:
            if mid.owners == NULL:
                raise MemoryError()
            memcpy(mid.owners, child.owners, child.nowners * sizeof(Owner))
        mid.nowners = child.nowners
        mid.owner_cap = child.nowners
        mid.last_access = child.last_access
        parent.children[index] = mid
        add_child(mid, child, 0)
        self.node_count += 1
        return 0

    cdef int _drop_node(self, Node* node) except -1:
        """Remove a childless node from the tree and free it."""
        cdef int32_t k
        for k in range(node.nowners):
            if node.owners[k].slot < self.slot_cap:
                self.slot_chars[node.owners[k].slot] -= node.length
        self.total_chars -= node.length
        self.node_count -= 1
        remove_child(node.parent, node)
        free_subtree(node)
        return 0

    cdef int hand_over(self, const Text* text, Py_ssize_t n, int32_t from_slot, int32_t to_slot,
                       double now) except -1:
        """Move the prefix group of text[:n] from one worker slot to another.

        The group is the subtree under the shallowest node of the prompt's
        path that carries at most half of from_slot's traffic (its hits
        there against its hits over the whole tree): a prefix the worker
        shares with nothing else moves whole, a prefix common to all its
        traffic (a global system prompt) stays, and a single hot prefix
        splits below it."""
        cdef Node* node = self.root
        cdef Node* child
        cdef Node* group = NULL
        cdef Py_ssize_t pos = 0, common
        cdef int32_t i, j
        cdef uint64_t total = 0
        for i in range(self.root.nchildren):
            j = owner_index(self.root.children[i], from_slot)
            if j >= 0:
                total += self.root.children[i].owners[j].hits
        while pos < n:
            i = child_index(node, char_at(text, pos))
            if i < 0:
                break
            child = node.children[i]
            common = common_prefix(child, text, pos, n)
            if common < child.length:
                break
            j = owner_index(child, from_slot)
            if j < 0:
                break
            if 2 * <uint64_t>child.owners[j].hits <= total:
                group = child
                break
            pos += common
            node = child
        if group != NULL:
            self._ensure_slot(to_slot)
            self._move_owner(group, from_slot, to_slot)
        self.insert(text, n, to_slot, now, INSERT_LEAD)
        return 0

    cdef int _move_owner(self, Node* node, int32_t from_slot, int32_t to_slot) except -1:
        cdef int32_t i, j, k
        j = owner_index(node, from_slot)
        if j >= 0:
            k = owner_index(node, to_slot)
            if k >= 0:
                node.owners[k].hits += node.owners[j].hits
                if node.owners[j].last > node.owners[k].last:
                    node.owners[k].last = node.owners[j].last
                remove_owner_at(node, j)
            else:
                node.owners[j].slot = to_slot
                self.slot_chars[to_slot] += node.length
            self.slot_chars[from_slot] -= node.length
        for i in range(node.nchildren):
            self._move_owner(node.children[i], from_slot, to_slot)
        return 0

    cdef int remove_slot(self, int32_t slot) except -1:
        """Forget a worker: drop its ownership everywhere, and every node
        that no worker owns any more."""
        self._remove_slot_under(self.root, slot)
        if slot < self.slot_cap:
            self.slot_chars[slot] = 0
        return 0

    cdef int _remove_slot_under(self, Node* node, int32_t slot) except -1:
        cdef int32_t i, j
        cdef Node* child
        i = node.nchildren - 1
        while i >= 0:
            child = node.children[i]
            j = owner_index(child, slot)
            if j >= 0:
                remove_owner_at(child, j)
                if child.nowners == 0:
                    # ownership is prefix-closed: nobody owns anything below
                    self._drop_subtree(child)
                else:
                    self._remove_slot_under(child, slot)
            i -= 1
        return 0

    cdef int _drop_subtree(self, Node* node) except -1:
        while node.nchildren:
            self._drop_subtree(node.children[node.nchildren - 1])
        self._drop_node(node)
        return 0

    cdef int64_t evict_to(self, int64_t max_chars) except -1:
        """Drop least-recently-used leaves until the tree holds at most
        max_chars characters; returns how many characters were evicted."""
        cdef int64_t before = self.total_chars
        cdef Node** heap
        cdef Py_ssize_t size = 0
        cdef Node* leaf
        cdef Node* parent
        if self.total_chars <= max_chars:
            return 0
        heap = <Node**>malloc((self.node_count + 1) * sizeof(Node*))
        if heap == NULL:
            raise MemoryError()
        try:
            self._collect_leaves(self.root, heap, &size)
            while self.total_chars > max_chars and size > 0:
                leaf = heap_pop(heap, &size)
                parent = leaf.parent
                self._drop_node(leaf)
                if parent != self.root and parent.nchildren == 0:
                    heap_push(heap, &size, parent)
        finally:
            free(heap)
        return before - self.total_chars

    cdef void _collect_leaves(self, Node* node, Node** heap, Py_ssize_t* size) noexcept:
        cdef int32_t i
        for i in range(node.nchildren):
            if node.children[i].nchildren == 0:
                heap_push(heap, size, node.children[i])
            else:
                self._collect_leaves(node.children[i], heap, size)

    # --- Python-facing API (tests, benchmarks, the policy's slow paths) ---

    def insert_text(self, str text, int slot, double now=-1.0, int mode=INSERT_HIT):
        cdef Text view = text_view(text, -1)
        if view.length:
            self.insert(&view, view.length, slot, now if now >= 0 else monotonic(), mode)

    def match_and_insert_text(self, str text, int slot, double now=-1.0, int mode=INSERT_HIT):
        """match() then insert_matched(): for tests, which check it against insert_text()."""
        cdef Text view = text_view(text, -1)
        cdef Node* best
        cdef Py_ssize_t depth, matched
        if view.length == 0:
            return 0
        matched = self.match(&view, view.length, &best, &depth)
        self.insert_matched(&view, view.length, best, matched, slot, now if now >= 0 else monotonic(), mode)
        return matched

    def match_text(self, str text):
        """(matched characters, owners of the deepest node reached as
        {slot: (hits, last)}, characters before that node)."""
        cdef Text view = text_view(text, -1)
        cdef Node* best
        cdef Py_ssize_t depth, matched
        cdef int32_t k
        if view.length == 0:
            return 0, {}, 0
        matched = self.match(&view, view.length, &best, &depth)
        owners = {}
        start = 0
        if best != NULL:
            for k in range(best.nowners):
                owners[best.owners[k].slot] = (best.owners[k].hits, best.owners[k].last)
            start = node_end(best) - best.length
        return matched, owners, start

    def hand_over_text(self, str text, int from_slot, int to_slot, double now=-1.0):
        cdef Text view = text_view(text, -1)
        self.hand_over(&view, view.length, from_slot, to_slot, now if now >= 0 else monotonic())

    def remove_worker_slot(self, int slot):
        self.remove_slot(slot)

    def evict(self, long long max_chars):
        return self.evict_to(max_chars)

    def chars_of(self, int slot):
        """Characters of the nodes this worker slot owns."""
        if slot < self.slot_cap:
            return self.slot_chars[slot]
        return 0

    def dump(self):
        """The tree as nested tuples (label, {slot: hits}, [children]), for tests."""
        return self._dump(self.root)

    cdef object _dump(self, Node* node):
        cdef int32_t i
        label = "".join(chr(label_at(node, i)) for i in range(node.length))
        owners = {node.owners[i].slot: node.owners[i].hits for i in range(node.nowners)}
        return (label, owners, [self._dump(node.children[i]) for i in range(node.nchildren)])
