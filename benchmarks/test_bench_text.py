"""Routing-text extraction from request bodies, parse included."""

import random

import orjson
import pytest

from smg._fast.routing_text import ENDPOINTS, routing_text


def chat_body(size: int) -> bytes:
    rng = random.Random(4)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    msgs = [{"role": "system", "content": " ".join(rng.choice(words) for _ in range(size // 12))}]
    for i in range(6):
        role = "user" if i % 2 == 0 else "assistant"
        msgs.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(size // 60))})
    return orjson.dumps({"model": "m", "messages": msgs, "stream": True})


@pytest.mark.parametrize("size", [1024, 16384, 65536])
def test_chat_text_extraction(benchmark, size):
    body = chat_body(size)
    ep = ENDPOINTS["/v1/chat/completions"]

    def extract():
        return routing_text(ep, orjson.loads(body))

    assert len(benchmark(extract)) > size // 2


@pytest.mark.parametrize("size", [1024, 16384, 65536])
def test_generate_text_extraction(benchmark, size):
    body = orjson.dumps({"text": "x" * size, "sampling_params": {"max_new_tokens": 16}})
    ep = ENDPOINTS["/generate"]

    def extract():
        return routing_text(ep, orjson.loads(body))

    assert len(benchmark(extract)) == size
