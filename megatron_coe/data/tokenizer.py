"""Tokenizers that need no download.

- ``byte``: UTF-8 bytes 0..255, end-of-document 256 (vocabulary 257).
- a ``tokenizers`` JSON file (HF tokenizers library), its end-of-document token named in the
  config (default ``<|endoftext|>``).
- :func:`train_bpe`: train a small byte-level BPE on given texts and save it as such a file.

Every tokenizer exposes what Megatron's GPT dataset reads: ``vocab_size``, ``eod``, ``pad``,
plus ``tokenize(text) -> list[int]`` and ``detokenize(ids) -> str``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

EOD_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    vocab_size = 257
    eod = 256
    pad = 256
    # Megatron's dataset cache keys include the tokenizer's identity.
    unique_identifiers = {"class": "ByteTokenizer", "vocab_size": 257}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A ``tokenizers`` library tokenizer saved as JSON."""

    def __init__(self, path: str | Path, eod_token: str = EOD_TOKEN):
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer file {path} is not a tokenizers JSON file: {err}") from None
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer file {path} has no end-of-document token {eod_token!r}")
        self.eod = self.pad = eod
        self.vocab_size = self._tok.get_vocab_size()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.unique_identifiers = {"class": "JsonTokenizer", "sha256": digest,
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def train_bpe(texts: Iterable[str], vocab_size: int, path: str | Path) -> JsonTokenizer:
    """Train a byte-level BPE with ``vocab_size`` entries on ``texts``; save to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return JsonTokenizer(path)


def load_tokenizer(spec: str, eod_token: str = EOD_TOKEN):
    """``byte`` or the path of a tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    return JsonTokenizer(spec, eod_token)
