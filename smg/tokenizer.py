"""The model's tokenizer, for precise (KV-event) routing: a request's token
ids must be those its engine caches, so the gateway tokenizes prompts as
the engine does, from the model's own `tokenizer.json` (Hugging Face
`tokenizers`). Only local files are read: nothing is downloaded."""

from __future__ import annotations

import os


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
