"""The radix tree against a small pure-Python model (hypothesis).

The model keeps, per worker slot, the strings inserted for it. From it:
  - the tree's match length is the longest common prefix with any string;
  - the owners of the node a match ends in are exactly the slots with a
    string that runs into that node (longer common prefix than where the
    node starts), and include every slot whose string matches as far;
  - the tree's size is the number of distinct non-empty prefixes of all
    strings, and a slot's share that of its own strings;
  - removing a slot is the same as never having inserted its strings.
Text includes non-ASCII and non-BMP characters: the tree works on code points.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from smg._fast.radix import RadixTree

# a small alphabet makes shared prefixes (and node splits) common
ALPHABET = st.sampled_from(list("ab") + ["é", "☃", "𝄞"])
TEXT = st.text(alphabet=ALPHABET, min_size=1, max_size=12)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), TEXT, st.integers(0, 3)),
        st.tuples(st.just("match"), TEXT),
        st.tuples(st.just("remove"), st.integers(0, 3)),
    ),
    max_size=60,
)


def lcp(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefixes(strings) -> set:
    return {s[:k] for s in strings for k in range(1, len(s) + 1)}


class Model:
    def __init__(self):
        self.strings: dict[int, set[str]] = {}

    def insert(self, text: str, slot: int) -> None:
        self.strings.setdefault(slot, set()).add(text)

    def remove(self, slot: int) -> None:
        self.strings.pop(slot, None)

    def all(self) -> set:
        return set().union(*self.strings.values()) if self.strings else set()


def check(tree: RadixTree, model: Model) -> None:
    assert tree.total_chars == len(prefixes(model.all()))
    for slot in range(4):
        assert tree.chars_of(slot) == len(prefixes(model.strings.get(slot, ())))


def check_match(tree: RadixTree, model: Model, text: str) -> None:
    matched, owners, start = tree.match_text(text)
    expected = max((lcp(text, s) for s in model.all()), default=0)
    assert matched == expected
    if matched == 0:
        assert owners == {}
        return
    assert start < matched
    running_in = {slot for slot, ss in model.strings.items() if any(lcp(text, s) > start for s in ss)}
    assert set(owners) == running_in
    deepest = {slot for slot, ss in model.strings.items() if any(lcp(text, s) >= matched for s in ss)}
    assert deepest <= set(owners)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_tree_matches_model(ops):
    tree = RadixTree()
    model = Model()
    for op in ops:
        if op[0] == "insert":
            tree.insert_text(op[1], op[2])
            model.insert(op[1], op[2])
        elif op[0] == "match":
            check_match(tree, model, op[1])
        else:
            tree.remove_worker_slot(op[1])
            model.remove(op[1])
        check(tree, model)
    for s in model.all():
        check_match(tree, model, s)


LONG_TEXT = st.text(alphabet=ALPHABET, min_size=1, max_size=80)  # longer than a compared block


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(TEXT, LONG_TEXT), st.integers(0, 3), st.sampled_from([0, 1, 2])), max_size=40))
def test_insert_after_match_builds_the_same_tree(inserts):
    """The cache-aware pick inserts with the match it already made
    (insert_matched); the tree must be the one a plain insert builds."""
    plain, reuse = RadixTree(), RadixTree()
    for t, (text, slot, mode) in enumerate(inserts):
        plain.insert_text(text, slot, now=float(t + 1), mode=mode)
        reuse.match_and_insert_text(text, slot, now=float(t + 1), mode=mode)
        assert reuse.dump() == plain.dump()
        assert reuse.total_chars == plain.total_chars and reuse.node_count == plain.node_count
        for k in range(4):
            assert reuse.chars_of(k) == plain.chars_of(k)


def test_long_labels_match_across_compared_blocks():
    tree = RadixTree()
    base = "x" * 100
    tree.insert_text(base + "A" + "y" * 50, 0)
    for cut in (0, 1, 15, 16, 17, 31, 32, 99):
        probe = base[:cut] + "Z" + base[cut + 1:]
        assert tree.match_text(probe)[0] == cut
    assert tree.match_text(base + "B")[0] == 100
    assert tree.match_text("☃" * 40)[0] == 0
    tree.insert_text("☃" * 40 + "𝄞" * 40, 1)
    assert tree.match_text("☃" * 40 + "𝄞" * 17 + "a")[0] == 57


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TEXT, st.integers(0, 3)), min_size=1, max_size=40), st.integers(0, 40))
def test_eviction_is_least_recently_used(inserts, budget):
    tree = RadixTree()
    last_use: dict[str, float] = {}
    for t, (text, slot) in enumerate(inserts):
        tree.insert_text(text, slot, now=float(t + 1))
        last_use[text] = float(t + 1)
    before = prefixes(last_use)
    tree.evict(budget)
    assert tree.total_chars <= budget

    def stored(node, path=""):
        label, _, children = node
        out = {path + label} if path + label else set()
        for c in children:
            out |= stored(c, path + label)
        return out

    kept = stored(tree.dump())
    assert kept <= before
    assert tree.total_chars == len({p for s in kept for p in (s[:k] for k in range(1, len(s) + 1))})
    # recency is monotonic: a string kept whole (one that is not just a prefix
    # of another) means every newer string is kept whole
    whole = {s for s in last_use if s in kept and not any(o != s and o.startswith(s) for o in last_use)}
    for s in whole:
        for other, t in last_use.items():
            if t > last_use[s]:
                assert other in kept, (s, other)
    # per-slot shares add up to no more than what each slot inserted
    for slot in range(4):
        assert 0 <= tree.chars_of(slot) <= tree.total_chars


def test_split_and_ownership_by_example():
    tree = RadixTree()
    tree.insert_text("hello world", 0)
    tree.insert_text("hello there", 1)
    label, _, children = tree.dump()
    assert label == "" and len(children) == 1
    assert children[0][0] == "hello " and children[0][1] == {0: 1, 1: 1}
    assert sorted(c[0] for c in children[0][2]) == ["there", "world"]
    matched, owners, start = tree.match_text("hello wonder")
    assert (matched, set(owners), start) == (8, {0}, 6)
    tree.remove_worker_slot(0)
    assert tree.match_text("hello wonder")[0] == 6
    assert tree.chars_of(0) == 0 and tree.total_chars == len("hello there")


def test_unicode_is_counted_in_code_points():
    tree = RadixTree()
    tree.insert_text("日本語のテキスト🎉", 2)
    assert tree.total_chars == 9  # 8 CJK characters and one emoji outside the BMP
    assert tree.match_text("日本語の別の文")[0] == 4


def test_hand_over_moves_a_prefix_group():
    tree = RadixTree()
    for i in range(6):
        tree.insert_text(f"[a] shared prefix one {i}", 0)
        tree.insert_text(f"[b] shared prefix two {i}", 0)
    tree.insert_text("[c] other", 1)
    tree.hand_over_text("[a] shared prefix one 9", 0, 2)
    # every [a] prompt now leads to slot 2; [b] stays with slot 0
    for i in range(6):
        _, owners, _ = tree.match_text(f"[a] shared prefix one {i}")
        assert max(owners, key=lambda s: owners[s][0]) == 2
        _, owners, _ = tree.match_text(f"[b] shared prefix two {i}")
        assert set(owners) == {0}
