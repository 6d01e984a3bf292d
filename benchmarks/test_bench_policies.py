"""Worker selection per policy, and label-selector matching."""

import pytest

from smg._fast.policies import ConsistentHashPolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy, WorkerGroup
from smg._fast.selector import parse_selector_items
from smg._fast.worker import READY, Worker


def group(policy, n):
    g = WorkerGroup("m", 0, policy)
    for i in range(n):
        w = Worker(f"w{i}", f"http://10.0.{i // 250}.{i % 250 + 1}:8000", "m")
        w.state = READY
        w.inflight = i % 7
        g.workers.append(w)
    g.refresh()
    return g


@pytest.mark.parametrize("n", [4, 100])
@pytest.mark.parametrize("policy", [RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy, ConsistentHashPolicy],
                         ids=lambda c: c.__name__)
def test_select(benchmark, policy, n):
    g = group(policy(), n)
    assert benchmark(g.select_py, None, b"user-1234", 1.0) is not None


def test_selector_match(benchmark):
    sel = parse_selector_items(["app=sglang", "environment in (production,staging)", "tier!=cpu", "!canary"])
    labels = {"app": "sglang", "environment": "production", "tier": "gpu", "pod-template-hash": "abc123",
              "statefulset.kubernetes.io/pod-name": "sglang-worker-0"}
    assert benchmark(sel.matches, labels)


def test_selector_parse(benchmark):
    assert benchmark(parse_selector_items, ["app=sglang", "env in (a,b,c)", "!canary", "gpu"])
