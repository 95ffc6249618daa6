"""jsonl text -> Megatron's indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    coe-preprocess --input data.jsonl --output-prefix out/train --tokenizer byte
                   [--text-key text | --text-key question --text-key answer]

Each line is a JSON object; the text of a document is its ``text-key`` fields joined by a
newline; every document ends with the tokenizer's end-of-document token.  Everything is checked
before a byte is written (empty file, a line that is not UTF-8 or not a JSON object, a missing
or non-string field, token ids outside the vocabulary), with the file and line in the message.
``--output-prefix`` must name a file prefix, not a directory.  Output goes to temporary names and
is renamed into place only when complete, so an existing dataset is never left half-written.

:func:`check_indexed_dataset` checks a ``.bin``/``.idx`` pair against the sizes its index
declares, so a truncated file is named before Megatron maps it.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path
from typing import Iterable

import numpy as np


def read_jsonl(path: str | Path, text_keys: list[str]) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    texts = []
    with path.open("rb") as f:  # bytes, decoded per line, so a bad byte is named by its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} "
                                 f"at column {err.start + 1}); convert the file to UTF-8") from None
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


def check_indexed_dataset(prefix: str | Path) -> int:
    """The number of sequences (documents, as written here) in ``prefix.bin/.idx``, after checking
    that both files exist, the index header is Megatron's, and neither file is shorter than the
    index declares.  ValueError naming the file otherwise.  Reads a few bytes of the index,
    not the token data."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise ValueError(f"{f} does not exist")
    head_size = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # magic, version, dtype code, two counts
    with idx.open("rb") as f:
        head = f.read(head_size)
    if len(head) < head_size or not head.startswith(_INDEX_HEADER):
        raise ValueError(f"{idx} is not a Megatron indexed-dataset index (bad or truncated "
                         "header); rebuild it with coe-preprocess")
    version, code, num_seqs, num_docs = struct.unpack_from("<QBQQ", head, len(_INDEX_HEADER))
    if version != 1 or code not in {c.value for c in DType}:
        raise ValueError(f"{idx}: unknown index version {version} or dtype code {code}")
    expected = head_size + num_seqs * (4 + 8) + num_docs * 8  # lengths, pointers, doc indices
    if idx.stat().st_size < expected:
        raise ValueError(f"{idx} is truncated: {idx.stat().st_size} bytes, its header declares "
                         f"{num_seqs} sequences ({expected} bytes); rebuild it with coe-preprocess")
    if num_seqs == 0:
        raise ValueError(f"{idx} holds no documents")
    # Megatron's builder writes sequences in order: the last one ends the .bin file.
    with idx.open("rb") as f:
        f.seek(head_size + 4 * (num_seqs - 1))
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(head_size + 4 * num_seqs + 8 * (num_seqs - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    needed = last_pointer + last_length * np.dtype(DType.dtype_from_code(code)).itemsize
    if bin_.stat().st_size < needed:
        raise ValueError(f"{bin_} is truncated: {bin_.stat().st_size} bytes, its index {idx.name} "
                         f"needs {needed}; rebuild the pair with coe-preprocess")
    return int(num_seqs)


def read_indexed_dataset(prefix: str | Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the mmap closes with ds


def output_prefix_path(output_prefix: str | Path) -> Path:
    """``output_prefix`` as the prefix the files are written under; a directory is refused
    (``out/`` would otherwise become ``out.bin`` beside the folder)."""
    text = str(output_prefix)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise ValueError(f"--output-prefix {text} names a directory; give a file prefix inside "
                         f"it, e.g. {Path(text) / 'train'} (writes train.bin and train.idx there)")
    return Path(text)


def preprocess(input_path, output_prefix, tokenizer, text_keys=("text",)) -> int:
    output_prefix = output_prefix_path(output_prefix)
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
        prefix = output_prefix_path(args.output_prefix)
        n = preprocess(args.input, prefix, load_tokenizer(args.tokenizer),
                       args.text_keys or ["text"])
    except ValueError as err:
        print(f"coe-preprocess: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} documents to {prefix}.bin and {prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
