"""The model's tokenizer, for precise (KV-event) routing: a request's token
ids must be those its engine caches, so the gateway tokenizes prompts as
the engine does, from the model's own `tokenizer.json` (Hugging Face
`tokenizers`). Only local files are read: nothing is downloaded."""

from __future__ import annotations

import bisect
import collections
import logging
import os
from array import array
from typing import Optional

from smg._fast.kvindex import chain_hashes, common_prefix

log = logging.getLogger("smg.tokenizer")


def tokenizer_file(path: str) -> str:
    """The tokenizer.json of --tokenizer-path / --model-path: the file, or
    the one in the directory. Raises ValueError with what is wrong."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise ValueError(f"{path}: no tokenizer.json in this directory (smg reads a model's fast tokenizer)")
        return candidate
    if os.path.isfile(path):
        return path
    raise ValueError(f"{path}: no such file or directory (smg loads tokenizers from local paths only; "
                     f"download the model first, e.g. huggingface-cli download)")


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a local path. Raises ValueError."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ValueError("precise routing needs the kv-events extra: pip install 'smg[kv-events]'") from None
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises its own Exception subclass
        raise ValueError(f"{file}: not a tokenizer.json ({e})") from None


class Tokenized:
    """A prompt's tokens as precise routing needs them: the chain hash of
    each full block (smg._fast.kvindex.chain_hashes) and the character where
    each token ends."""

    __slots__ = ("text", "ids", "ends", "block_size", "hashes")

    def __init__(self, text: str, ids: array, ends: array, block_size: int, hashes: list):
        self.text = text
        self.ids = ids
        self.ends = ends
        self.block_size = block_size
        self.hashes = hashes

    def chars_of(self, blocks: int) -> int:
        """The characters the first `blocks` blocks cover."""
        return self.ends[blocks * self.block_size - 1] if blocks else 0


class PrefixTokenizer:
    """Tokenizes prompts, reusing the tokens of a recent prompt that starts
    the same way: a conversation's next turn, another question about the
    same document. Only the part after the last word boundary the two share
    is tokenized (tokenizers split words at spaces, so tokens never cross
    such a boundary) and only its blocks are hashed.

    That a tokenizer never merges across a space holds for byte-level BPE
    (GPT-2, Llama 3, Qwen) and SentencePiece-style tokenizers; it is checked:
    one prompt in CHECK_EVERY is tokenized whole as well, and a tokenizer
    whose whole and reused tokens differ is from then on always tokenized
    whole (logged once)."""

    KEY_CHARS = 256         # prompts are grouped by their first characters
    PER_GROUP = 32          # recent prompts kept per group (conversations sharing a system prompt share one)
    MIN_REUSE = 1024        # shorter shared starts are tokenized again
    MARGIN = 64             # characters before the shared end where reuse stops
    CHECK_EVERY = 64

    def __init__(self, tokenizer, max_chars: int = 16 << 20):
        self.tokenizer = tokenizer
        self.max_chars = max_chars
        self.groups: collections.OrderedDict[str, list[Tokenized]] = collections.OrderedDict()
        self.chars = 0
        self.reused = 0             # prompts that reused a recent one's tokens
        self.whole = 0              # prompts tokenized whole
        self.encodes = 0
        self.enabled = True

    def encode(self, text: str, block_size: int) -> Tokenized:
        self.encodes += 1
        key = text[:self.KEY_CHARS]
        group = self.groups.get(key)
        out = None
        if group is not None and self.enabled:
            self.groups.move_to_end(key)
            out = self._reuse(text, block_size, group)
            if out is not None and self.encodes % self.CHECK_EVERY == 0:
                whole = self._whole(text, block_size)
                if whole.ids != out.ids:
                    self.enabled = False
                    log.warning("tokenizer: reusing a shared start changed a prompt's tokens; prompts are "
                                "tokenized whole from now on")
                    self.groups.clear()
                    self.chars = 0
                    return whole
            if out is not None:
                self.reused += 1
        if out is None:
            out = self._whole(text, block_size)
        if self.enabled:
            self._keep(key, out)
        return out

    def _whole(self, text: str, block_size: int) -> Tokenized:
        self.whole += 1
        enc = self.tokenizer.encode(text)
        ids = array("I", enc.ids)
        ends = array("I", [end for _, end in enc.offsets])
        return Tokenized(text, ids, ends, block_size, chain_hashes(enc.ids, block_size))

    def _reuse(self, text: str, block_size: int, group: list) -> Optional[Tokenized]:
        best, shared = None, 0
        for entry in group:
            n = common_prefix(text, entry.text)
            if n > shared:
                best, shared = entry, n
        if best is None or shared < self.MIN_REUSE:
            return None
        # the last token of `best` starting at a word boundary well inside the shared part
        k = bisect.bisect_right(best.ends, shared - self.MARGIN)
        while k > 0:
            s = best.ends[k - 1]
            if text[s] == " " and not text[s - 1].isspace() and s + 1 < len(text) and not text[s + 1].isspace():
                break
            k -= 1
        if k == 0:
            return None
        start = best.ends[k - 1]
        enc = self.tokenizer.encode(text[start:], add_special_tokens=False)
        ids = best.ids[:k]
        ids.extend(enc.ids)
        ends = best.ends[:k]
        ends.extend(start + end for _, end in enc.offsets)
        if best.block_size == block_size:
            kept = k // block_size
            hashes = chain_hashes(ids[kept * block_size:].tolist(), block_size, best.hashes[kept - 1]) \
                if kept else chain_hashes(ids.tolist(), block_size)
            hashes[:0] = best.hashes[:kept]
        else:
            hashes = chain_hashes(ids.tolist(), block_size)
        return Tokenized(text, ids, ends, block_size, hashes)

    def _keep(self, key: str, entry: Tokenized) -> None:
        group = self.groups.setdefault(key, [])
        # a prompt this one extends (the conversation's previous turn) is not needed any more
        for i, old in enumerate(group):
            if entry.text.startswith(old.text):
                self.chars -= len(old.text)
                del group[i]
                break
        group.insert(0, entry)
        self.chars += len(entry.text)
        while len(group) > self.PER_GROUP:
            self.chars -= len(group.pop().text)
        while self.chars > self.max_chars and self.groups:
            _, dropped = self.groups.popitem(last=False)
            self.chars -= sum(len(e.text) for e in dropped)
