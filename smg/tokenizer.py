"""The model's tokenizer, for precise (KV-event) routing: a request's token
ids must be those its engine caches, so the gateway tokenizes prompts as
the engine does, from the model's own `tokenizer.json` (Hugging Face
`tokenizers`), and renders chat requests through the model's chat template
(Jinja) first. Only local files are read: nothing is downloaded."""

from __future__ import annotations

import bisect
import collections
import datetime
import json
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


class ChatTemplate:
    """The model's chat template, rendered as Hugging Face's
    apply_chat_template renders it for an engine (sandboxed Jinja with
    trim_blocks and lstrip_blocks, raise_exception, strftime_now, a tojson
    that keeps non-ASCII, the special tokens of tokenizer_config.json, and
    add_generation_prompt), so a chat request's prompt is the text its
    engine tokenizes."""

    def __init__(self, source: str, special_tokens: dict):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = special_tokens
        self.errors = 0

    def render(self, body: dict) -> Optional[str]:
        """The prompt of a chat request (OpenAI's shape), or None when its
        messages are not a list of messages or the template refuses them."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return None
        try:
            return self.template.render(messages=messages, tools=body.get("tools"), add_generation_prompt=True,
                                        **self.special_tokens)
        except Exception:  # a template's raise_exception, or any error in its logic
            self.errors += 1
            return None


def chat_renderer(template: ChatTemplate, tokenizer):
    """A chat request's prompt as the gateway tokenizes it (with the
    tokenizer's special tokens, as any prompt): the template's text, less a
    leading BOS token where the tokenizer adds that one itself. The engine
    tokenizes the template's text without adding special tokens; both give
    the same ids."""
    bos = template.special_tokens.get("bos_token") or ""
    with_special = tokenizer.encode("a").ids
    without = tokenizer.encode("a", add_special_tokens=False).ids
    added = with_special[:len(with_special) - len(without)]
    strip = bool(bos) and bool(added) and tokenizer.encode(bos, add_special_tokens=False).ids == added

    def render(body: dict) -> Optional[str]:
        text = template.render(body)
        if text is not None and strip and text.startswith(bos):
            return text[len(bos):]
        return text

    return render


def load_chat_template(path: str, override: Optional[str] = None) -> Optional[ChatTemplate]:
    """The chat template beside the tokenizer.json of `path` (the file
    chat_template.jinja, or tokenizer_config.json's chat_template, the
    "default" one where it lists several), or the file `override`
    (--chat-template); None where the model ships none. Raises ValueError on
    one that does not parse."""
    folder = os.path.dirname(tokenizer_file(path))
    config: dict = {}
    config_file = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{config_file}: {e}") from None
    source = None
    jinja_file = override or os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            source = f.read()
    else:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    special = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        special[name] = value if isinstance(value, str) else ""
    try:
        return ChatTemplate(source, special)
    except Exception as e:  # jinja2.TemplateSyntaxError
        raise ValueError(f"{folder}: the chat template does not parse ({e})") from None
