"""What a run's data is, by content: the record that keys the prepared data and is saved in
every checkpoint.

The record holds a SHA-256 of each input's bytes (a jsonl file; an indexed dataset's ``.idx``
and ``.bin``; the generated arithmetic documents' text), the tokenizer's identity (``byte``;
the size of the BPE trained on the data; a tokenizer file's SHA-256), and the settings that
decide which documents train: text keys, split, blend weights and data seed.  Edit any of
them and the fingerprint changes, so the data is prepared afresh (Megatron's index cache
included) and a resume from a checkpoint of the old data is refused, naming what changed.
Hashing reads every input once per start (a few seconds per GB).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from megatron_coe.config import Config


def _file_sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def texts_sha256(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)  # length-prefixed: no two lists collide
    return h.hexdigest()


def _normalized(weights: list[float]) -> list[float]:
    return [w / sum(weights) for w in weights] if weights else []


def describe(config: Config) -> dict:
    """The data record of ``config`` (reads the inputs; ValueError names a missing one)."""
    from megatron_coe.data import arithmetic

    d = config.data
    if d.source == "arithmetic":
        inputs = [{"name": f"arithmetic(num_documents={d.num_documents}, seed={d.seed})",
                   "sha256": texts_sha256(arithmetic.documents(d.num_documents, d.seed))}]
    elif d.source == "jsonl":
        inputs = [{"name": p, "sha256": _file_sha256([Path(p)])} for p in d.paths]
    else:
        inputs = [{"name": p, "sha256": _file_sha256([Path(p + ".idx"), Path(p + ".bin")])}
                  for p in d.paths]
    if d.tokenizer in ("byte", "bpe"):
        tokenizer = "byte" if d.tokenizer == "byte" else f"bpe(vocab_size={d.bpe_vocab_size})"
    else:
        tokenizer = f"{d.tokenizer} (sha256 {_file_sha256([Path(d.tokenizer)])})"
    return {
        "source": d.source,
        "inputs": inputs,
        "text_keys": list(d.text_keys) if d.source == "jsonl" else [],
        "tokenizer": tokenizer,
        "split": _normalized([float(x) for x in d.split.split(",")]),
        "weights": _normalized(list(d.weights)),
        "seed": d.seed,
    }


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def differences(saved: dict, current: dict) -> list[str]:
    """What differs between two records, one phrase per difference."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if key == "inputs" and a and b and len(a) == len(b):
            for x, y in zip(a, b):
                if x["name"] != y["name"]:
                    out.append(f"input {x['name']} is now {y['name']}")
                elif x["sha256"] != y["sha256"]:
                    out.append(f"{x['name']} changed (sha256 {x['sha256'][:12]}... at the "
                               f"checkpoint, {y['sha256'][:12]}... now)")
        else:
            out.append(f"data {key}: {a} at the checkpoint, {b} now")
    return out
