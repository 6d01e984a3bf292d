# cython: boundscheck=False, wraparound=False
"""Which KV-cache blocks each worker's engine holds, from the engine's own
events (smg/kv_events.py feeds it; CacheAwarePolicy asks it).

Engines name a block by a hash of their own (vLLM seeds it per process,
SGLang namespaces it by LoRA and salt), so the same prompt has different
hashes on different workers and the gateway cannot compute them. The index
names a block by its own chain hash instead: the hash of its parent's chain
hash and its token ids, recomputed from the tokens every BlockStored event
carries. A request's token blocks hash the same way, so "does worker w hold
the first k blocks of this prompt" is k lookups.

Per worker, a map from the engine's hash to ours turns BlockRemoved (which
names engine hashes only) and a stored block's parent into our names. A
block held by several workers is one entry whose value is a bit set of
their slots (the policy's worker slots)."""

from libc.stdint cimport uint64_t
from cpython.long cimport PyLong_AsUnsignedLongLongMask

from libc.string cimport memcmp

from smg._fast.hashing cimport mix64
from smg._fast.text cimport Text, char_at, text_view

# the chain hash of "no parent": a block at the start of a prompt
DEF CHAIN_ROOT = 0x243F6A8885A308D3


cdef inline uint64_t extend(uint64_t parent, list tokens, Py_ssize_t start, Py_ssize_t end) except? 0:
    """The chain hash of the block tokens[start:end] after `parent`."""
    cdef uint64_t h = mix64(parent ^ <uint64_t>(end - start))
    cdef Py_ssize_t i
    for i in range(start, end):
        h = mix64(h ^ PyLong_AsUnsignedLongLongMask(tokens[i]))
    return h


def chain_hashes(list tokens, Py_ssize_t block_size, object parent=None):
    """The chain hash of each full block of `tokens`; `parent`: the chain
    hash of the block before them (None: they start a prompt)."""
    cdef list out = []
    cdef uint64_t h = CHAIN_ROOT if parent is None else <uint64_t>parent
    cdef Py_ssize_t start = 0, n = len(tokens)
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    while start + block_size <= n:
        h = extend(h, tokens, start, start + block_size)
        out.append(h)
        start += block_size
    return out


cdef class BlockIndex:
    """The blocks of every worker slot of one model's workers."""
    cdef dict owners            # our chain hash -> bit set of the slots holding it
    cdef list engine_names      # slot -> {engine hash: our chain hash} (None: no slot)
    cdef public Py_ssize_t max_blocks_per_slot
    cdef public long long unknown_parents   # stored blocks whose parent the slot does not hold

    def __init__(self, Py_ssize_t max_blocks_per_slot=1 << 20):
        self.owners = {}
        self.engine_names = []
        self.max_blocks_per_slot = max_blocks_per_slot
        self.unknown_parents = 0

    cdef dict names(self, int slot):
        while len(self.engine_names) <= slot:
            self.engine_names.append(None)
        cdef dict m = self.engine_names[slot]
        if m is None:
            m = {}
            self.engine_names[slot] = m
        return m

    def blocks(self, int slot):
        """How many blocks the slot holds."""
        if slot >= len(self.engine_names) or self.engine_names[slot] is None:
            return 0
        return len(<dict>self.engine_names[slot])

    def __len__(self):
        """Distinct blocks held by any slot."""
        return len(self.owners)

    def stored(self, int slot, list block_hashes, object parent, list token_ids, Py_ssize_t block_size):
        """BlockStored: the slot holds `block_hashes` (engine names), the first
        a child of `parent` (an engine name, None at a prompt's start), their
        tokens `token_ids` in order, `block_size` to a block (the last may be
        shorter). Returns the blocks added; raises OverflowError when the
        slot would hold more than max_blocks_per_slot."""
        cdef dict names = self.names(slot)
        cdef object bit = 1 << slot
        cdef uint64_t h
        cdef Py_ssize_t start = 0, end, n = len(token_ids), added = 0
        cdef object ours, engine_hash, held
        if parent is None:
            h = CHAIN_ROOT
        else:
            ours = names.get(parent)
            if ours is None:
                # the parent was evicted, or stored before this index began:
                # the blocks cannot be named (a request never matches past a
                # block the worker lacks, so they could not be hit anyway)
                self.unknown_parents += 1
                return 0
            h = <uint64_t>ours
        if len(names) + len(block_hashes) > self.max_blocks_per_slot:
            raise OverflowError(f"over {self.max_blocks_per_slot} blocks")
        for engine_hash in block_hashes:
            if start >= n:
                break
            end = start + block_size if start + block_size < n else n
            h = extend(h, token_ids, start, end)
            start = end
            ours = h
            if engine_hash not in names:
                added += 1
            names[engine_hash] = ours
            held = self.owners.get(ours)
            self.owners[ours] = bit if held is None else (held | bit)
        return added

    def removed(self, int slot, list block_hashes):
        """BlockRemoved: the slot no longer holds these blocks (engine names).
        Returns the blocks taken off."""
        cdef dict names = self.names(slot)
        cdef object bit = 1 << slot, ours, held
        cdef Py_ssize_t taken = 0
        for engine_hash in block_hashes:
            ours = names.pop(engine_hash, None)
            if ours is None:
                continue
            taken += 1
            self.drop(ours, bit)
        return taken

    cdef int drop(self, object ours, object bit) except -1:
        held = self.owners.get(ours)
        if held is None:
            return 0
        held = held & ~bit
        if held:
            self.owners[ours] = held
        else:
            del self.owners[ours]
        return 0

    def cleared(self, int slot):
        """AllBlocksCleared, or a stream that must be rebuilt: the slot holds nothing."""
        if slot >= len(self.engine_names) or self.engine_names[slot] is None:
            return
        cdef dict names = self.engine_names[slot]
        cdef object bit = 1 << slot
        for ours in names.values():
            self.drop(ours, bit)
        self.engine_names[slot] = None

    def match(self, list hashes, object slots):
        """{slot: leading blocks of `hashes` it holds} for the slots in the bit
        set `slots` holding at least one."""
        cdef dict out = {}
        cdef object alive = slots, held, gone
        cdef Py_ssize_t depth = 0
        cdef int s
        for h in hashes:
            held = self.owners.get(h)
            if held is None:
                break
            held = held & alive
            gone = alive & ~held
            if gone and depth:
                for s in slots_in(gone):
                    out[s] = depth
            alive = held
            if not alive:
                break
            depth += 1
        if alive and depth:
            for s in slots_in(alive):
                out[s] = depth
        return out


cpdef list slots_in(object mask):
    """The slots in a bit set, in order."""
    cdef list out = []
    cdef int s = 0
    while mask:
        if mask & 1:
            out.append(s)
        mask >>= 1
        s += 1
    return out


def common_prefix(str a, str b):
    """How many leading characters a and b share."""
    cdef Text x = text_view(a, -1), y = text_view(b, -1)
    cdef Py_ssize_t n = x.length if x.length < y.length else y.length, i = 0, step
    if x.kind == y.kind:
        # whole runs at a time where both are stored alike
        step = 4096
        while i + step <= n and memcmp(<const char*>x.data + i * x.kind, <const char*>y.data + i * y.kind,
                                       step * x.kind) == 0:
            i += step
    while i < n and char_at(&x, i) == char_at(&y, i):
        i += 1
    return i
