"""The tokenizer of precise routing: local files only, and the reuse of a
recent prompt's tokens (PrefixTokenizer) gives exactly the tokens and block
hashes of tokenizing the prompt whole, or is switched off."""

from __future__ import annotations

import random

import pytest

from smg._fast.kvindex import chain_hashes, common_prefix
from smg.simulated_engine import write_tokenizer
from smg.tokenizer import PrefixTokenizer, load_tokenizer

WORDS = "the of and to in is model token cache prefix worker request route gateway latency batch".split()


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(1)
    return load_tokenizer(write_tokenizer(str(tmp_path_factory.mktemp("t")), [words(rng, 300) for _ in range(30)],
                                          vocab_size=500))


def whole(tok, text, bs):
    ids = tok.encode(text).ids
    return ids, chain_hashes(ids, bs)


def test_reused_tokens_are_the_whole_prompts_tokens(tokenizer):
    rng = random.Random(2)
    pt = PrefixTokenizer(tokenizer)
    pt.CHECK_EVERY = 10 ** 9       # compared here instead
    doc = "[doc] " + words(rng, 800)
    history = "[conv] " + words(rng, 300)
    prompts = []
    for _ in range(8):
        prompts.append(doc + " Question: " + words(rng, rng.randint(5, 40)))
        history += " USER: " + words(rng, 30)
        prompts.append(history)
        history += " ASSISTANT: " + words(rng, 60) + "  double  spaces,punctuation!  "
    for p in prompts:
        got = pt.encode(p, 16)
        ids, hashes = whole(tokenizer, p, 16)
        assert list(got.ids) == ids and got.hashes == hashes
        assert got.chars_of(len(hashes)) == tokenizer.encode(p).offsets[16 * len(hashes) - 1][1]
    assert pt.reused >= 12 and pt.enabled


class _CountingTokenizer:
    """Words are tokens whose id depends on how many words come before them:
    a tokenizer whose tokens depend on more than the text around them."""

    class Encoding:
        def __init__(self, ids, offsets):
            self.ids, self.offsets = ids, offsets

    def encode(self, text, add_special_tokens=True):
        ids, offsets, i = [], [], 0
        while i < len(text):
            j = text.find(" ", i + 1)
            j = len(text) if j < 0 else j
            ids.append(len(ids) % 2 * 1000 + len(text[i:j]))
            offsets.append((i, j))
            i = j
        return self.Encoding(ids, offsets)


def test_a_tokenizer_whose_tokens_depend_on_their_position_is_tokenized_whole():
    tok = _CountingTokenizer()
    pt = PrefixTokenizer(tok)
    pt.CHECK_EVERY = 1
    base = "x" + " ef g" * 500
    pt.encode(base + " zz", 4)
    out = pt.encode(base + " cd", 4)       # tokenizing from a word inside the shared start renumbers the words
    assert list(out.ids) == tok.encode(base + " cd").ids
    assert not pt.enabled and pt.reused == 0
    assert list(pt.encode(base + " cd yy", 4).ids) == tok.encode(base + " cd yy").ids


def test_the_cache_is_bounded(tokenizer):
    rng = random.Random(3)
    pt = PrefixTokenizer(tokenizer, max_chars=20_000)
    for i in range(50):
        pt.encode(f"[p{i}] " + words(rng, 400), 16)
    assert pt.chars <= 20_000 and sum(len(e.text) for g in pt.groups.values() for e in g) == pt.chars


def test_common_prefix_counts_shared_characters():
    a = "x" * 10_000 + "abc"
    assert common_prefix(a, a) == len(a)
    assert common_prefix(a, "x" * 10_000 + "abd") == 10_002
    assert common_prefix(a, "x" * 5000 + "é") == 5000       # different storage widths
    assert common_prefix("", a) == 0


def test_tokenizers_load_from_local_paths_only(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="local paths only"):
        load_tokenizer("meta-llama/Llama-3-8B")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a tokenizer.json"):
        load_tokenizer(str(tmp_path))


def test_a_chat_prompt_gets_the_ids_its_engine_tokenizes(tmp_path):
    """The engine tokenizes a rendered chat without adding special tokens
    (the template wrote its BOS); the gateway tokenizes every prompt with
    them, so the renderer leaves out a BOS the tokenizer adds itself."""
    import json

    from tokenizers import processors

    from smg.tokenizer import chat_renderer, load_chat_template

    rng = random.Random(4)
    path = write_tokenizer(str(tmp_path), [words(rng, 300) for _ in range(20)], vocab_size=400)
    tok = load_tokenizer(path)
    tok.add_special_tokens(["<s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"}))
    tok = load_tokenizer(path)
    template = load_chat_template(path)
    body = {"messages": [{"role": "user", "content": words(rng, 40)}]}
    engine_ids = tok.encode(template.render(body), add_special_tokens=False).ids
    assert engine_ids[0] == tok.token_to_id("<s>") and engine_ids[1] != engine_ids[0]
    assert tok.encode(chat_renderer(template, tok)(body)).ids == engine_ids
