"""jsonl text -> Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    coe-preprocess --input data.jsonl --output-prefix out/train --tokenizer byte
                   [--text-key text | --text-key question --text-key answer]

Each line is a JSON object; the text of a document is its ``text-key`` fields joined by a
newline; every document ends with the tokenizer's end-of-document token.  Everything is checked
before a byte is written (empty file, a line that is not a JSON object, a missing or non-string
field, token ids outside the vocabulary), with the file and line in the message.  Output goes to
temporary names and is renamed into place only when complete, so an existing dataset is never
left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable

import numpy as np


def read_jsonl(path: str | Path, text_keys: list[str]) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            parts = []
            for key in text_keys:
                if not isinstance(obj.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} is missing or not a string")
                parts.append(obj[key])
            texts.append("\n".join(parts))
    if not texts:
        raise ValueError(f"{path}: no documents (the file is empty)")
    return texts


def tokenize_documents(texts: Iterable[str], tokenizer, source: str = "<documents>") -> list[np.ndarray]:
    docs = []
    for i, text in enumerate(texts, start=1):
        ids = np.asarray(tokenizer.tokenize(text) + [tokenizer.eod], dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= tokenizer.vocab_size)]
        if bad.size:
            raise ValueError(f"{source}: document {i} has token id {int(bad[0])} outside the "
                             f"vocabulary (size {tokenizer.vocab_size})")
        docs.append(ids)
    return docs


def write_indexed_dataset(docs: list[np.ndarray], prefix: str | Path, vocab_size: int) -> None:
    """Write ``prefix.bin/.idx`` atomically (temporary names, then rename)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
    for ids in docs:
        builder.add_document(ids, [len(ids)])
    builder.finalize(f"{tmp}.idx")
    os.replace(f"{tmp}.bin", f"{prefix}.bin")
    os.replace(f"{tmp}.idx", f"{prefix}.idx")


def read_indexed_dataset(prefix: str | Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the mmap closes with ds


def preprocess(input_path, output_prefix, tokenizer, text_keys=("text",)) -> int:
    texts = read_jsonl(input_path, list(text_keys))
    docs = tokenize_documents(texts, tokenizer, str(input_path))
    write_indexed_dataset(docs, output_prefix, tokenizer.vocab_size)
    return len(docs)


def main(argv=None) -> int:
    from megatron_coe.data.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="coe-preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizers JSON file")
    parser.add_argument("--text-key", action="append", dest="text_keys")
    args = parser.parse_args(argv)
    try:
        n = preprocess(args.input, args.output_prefix, load_tokenizer(args.tokenizer),
                       args.text_keys or ["text"])
    except ValueError as err:
        print(f"coe-preprocess: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} documents to {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
