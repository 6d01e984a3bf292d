"""Cache-aware routing hot path: the radix tree and the policy's pick.

    .venv/bin/python -m pytest benchmarks/ --benchmark-only
"""

import random

import pytest

from smg._fast.policies import CacheAwarePolicy
from smg._fast.radix import RadixTree
from smg._fast.worker import READY, Worker

SIZES = [4096, 16384, 65536]
WORKERS = [10, 100, 500]


def make_text(rng: random.Random, n: int) -> str:
    words = "the of and to in is you that it he was for on are as with his they at be this".split()
    out = []
    total = 0
    while total < n:
        w = rng.choice(words)
        out.append(w)
        total += len(w) + 1
    return " ".join(out)[:n]


def populated_tree(n_workers: int, size: int, prefixes: int = 16, per_prefix: int = 8):
    rng = random.Random(1)
    heads = [make_text(rng, size // 2) for _ in range(prefixes)]
    tree = RadixTree()
    for i in range(prefixes * per_prefix):
        tree.insert_text(heads[i % prefixes] + make_text(rng, size // 2), i % n_workers, now=float(i))
    return tree, heads, rng


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n_workers", WORKERS)
def test_tree_match(benchmark, size, n_workers):
    tree, heads, rng = populated_tree(n_workers, size)
    probe = heads[3] + make_text(rng, size // 2)
    matched, _, _ = benchmark(tree.match_text, probe)
    assert matched >= size // 2


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n_workers", WORKERS)
def test_tree_insert(benchmark, size, n_workers):
    tree, heads, rng = populated_tree(n_workers, size)
    texts = [heads[i % len(heads)] + make_text(rng, size // 2) for i in range(64)]
    state = {"i": 0}

    def insert():
        i = state["i"] = state["i"] + 1
        tree.insert_text(texts[i % 64], i % n_workers, now=1e6 + i)

    benchmark(insert)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("n_workers", WORKERS)
def test_cache_aware_pick(benchmark, size, n_workers):
    """match + owner choice + spill gate + insert: one routing decision."""
    ws = []
    for i in range(n_workers):
        w = Worker(f"w{i}", f"http://10.0.{i // 250}.{i % 250 + 1}:8000", "m")
        w.state = READY
        ws.append(w)
    policy = CacheAwarePolicy()
    rng = random.Random(2)
    heads = [make_text(rng, size // 2) for _ in range(32)]
    texts = [heads[i % 32] + make_text(rng, size // 2) for i in range(256)]
    for i, t in enumerate(texts):
        policy.pick_py(ws, t, None, i * 0.001)
    state = {"i": 0}

    def pick():
        i = state["i"] = state["i"] + 1
        return policy.pick_py(ws, texts[i % 256], None, 1.0 + i * 0.001)

    assert benchmark(pick) is not None


@pytest.mark.parametrize("n_chars", [1_000_000, 8_000_000])
def test_tree_eviction(benchmark, n_chars):
    """Evicting half of a tree of n_chars characters (LRU leaves)."""
    rng = random.Random(3)
    texts = [make_text(rng, 2048) for _ in range(n_chars // 2048)]

    def setup():
        tree = RadixTree()
        for i, t in enumerate(texts):
            tree.insert_text(t, i % 50, now=float(i))
        return (tree,), {}

    def evict(tree):
        return tree.evict(tree.total_chars // 2)

    evicted = benchmark.pedantic(evict, setup=setup, rounds=3, iterations=1)
    assert evicted > 0
