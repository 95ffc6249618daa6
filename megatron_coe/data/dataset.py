"""Datasets for a run: tokenizer, indexed data in the run directory, Megatron's GPT datasets,
and deterministic batches.

Prepared data is keyed by content (:mod:`megatron_coe.data.fingerprint`)::

    run_dir/data/current.json     the data record of the run's latest start, and its directory
    run_dir/data/<fingerprint>/   tokenizer.json (bpe), part{i}.bin/.idx, cache/ (Megatron's
                                  sample indices); written under a temporary name, renamed when
                                  complete, reused as long as the inputs are unchanged

Before Megatron's dataset builder runs, every indexed dataset is checked (a truncated file is
named) and so is the split: a train, valid or test part with weight > 0 but no documents makes
Megatron's builder loop forever, so it is refused with the document count and the fix.

Sample order is a pure function of the step: step s (0-based) uses global samples
[s * G, (s + 1) * G) of the training dataset (G = global batch); data-parallel rank r takes the
r-th contiguous slice of G / dp samples, in micro-batches.  The data position saved in a
checkpoint is therefore just the step, and resume is exact.  Validation always reads the same
first ``eval_iters * G`` validation samples, so evaluations are comparable across a run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_coe.config import Config
from megatron_coe.data import arithmetic, fingerprint, preprocess
from megatron_coe.data.tokenizer import JsonTokenizer, load_tokenizer, train_bpe

PARTS = ("train", "valid", "test")
CURRENT = "current.json"


def split_ranges(num_documents: int, split: str) -> list[tuple[int, int] | None]:
    """The [begin, end) documents of the train, valid and test parts, exactly as Megatron's
    builder computes them (``blended_megatron_dataset_builder._build_megatron_dataset_splits``);
    None for a part of weight 0, which Megatron does not build."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * float(num_documents))),
                                    int(round(m[1] * float(num_documents))))
            for m in matrix]


def _smallest_safe_count(split: str) -> int | None:
    """The document count from which on every part of weight > 0 is non-empty (None when that
    needs more than a million documents)."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    bounds = [m for m in convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
              if m is not None]
    # a part of width w holds more than w * n - 1 documents: every n > 2 / w is safe
    limit = int(2 / min(b - a for a, b in bounds)) + 2
    if limit > 1_000_000:
        return None
    n = np.arange(1, limit + 1, dtype=np.float64)
    ok = np.all([np.round(b * n) > np.round(a * n) for a, b in bounds], axis=0)
    return int(limit - np.argmin(ok[::-1])) + 1 if not ok.all() else 1


def _parts_ok(num_documents: int, split: str) -> bool:
    return all(r is None or r[1] > r[0] for r in split_ranges(num_documents, split))


def check_split(num_documents: int, split: str, what: str) -> None:
    """ValueError unless every part of ``split`` with weight > 0 gets a document of ``what``;
    the message offers the smallest document count and a split that work."""
    for part, rng in zip(PARTS, split_ranges(num_documents, split)):
        if rng is not None and rng[1] <= rng[0]:
            least = _smallest_safe_count(split)
            fixes = [f"use at least {least} documents" if least else "use more documents"]
            weights = [x.strip() for x in split.split(",")]
            candidates = ([",".join(weights[:2] + ["0"])] if part == "test" else []) + (
                [f"{num_documents - 1},1,0"] if num_documents >= 2 else [])
            fixes += [f"set data.split={c}" for c in candidates if _parts_ok(num_documents, c)][:1]
            raise ValueError(
                f"{what} has {num_documents} documents: data.split={split} leaves the {part} "
                f"part empty (Megatron's dataset builder would loop forever on it); "
                + " or ".join(fixes))


def _texts(config: Config) -> list[list[str]]:
    """The documents of each data path (arithmetic: one generated set)."""
    d = config.data
    if d.source == "arithmetic":
        return [arithmetic.documents(d.num_documents, d.seed)]
    return [preprocess.read_jsonl(p, d.text_keys) for p in d.paths]


def _train_part(texts: list[str], split: str) -> list[str]:
    """The training part of the documents (Megatron splits documents in order)."""
    begin, end = split_ranges(len(texts), split)[0]
    return texts[begin:end]


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _sources(config: Config) -> list[str]:
    """How each data path is named in messages."""
    d = config.data
    if d.source == "arithmetic":
        return [f"data.num_documents={d.num_documents} (source=arithmetic)"]
    return list(d.paths)


def _write_prepared(config: Config, target: Path, record: dict) -> None:
    """Tokenizer and indexed datasets of ``config`` into ``target``, atomically: built in a
    temporary directory beside it and renamed, so ``target`` exists only when complete."""
    d = config.data
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        texts = None if d.source == "indexed" else _texts(config)
        if d.tokenizer == "bpe":
            train_text = [t for docs in texts for t in _train_part(docs, d.split)]
            train_bpe(train_text, d.bpe_vocab_size, tmp / "tokenizer.json")
        tokenizer = _tokenizer(config, tmp)
        for i, docs in enumerate(texts or []):
            ids = preprocess.tokenize_documents(docs, tokenizer, _sources(config)[i])
            preprocess.write_indexed_dataset(ids, tmp / f"part{i}", tokenizer.vocab_size)
        (tmp / "record.json").write_text(json.dumps(record, indent=1))
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _part_prefixes(config: Config, data_dir: Path) -> list[str]:
    return [str(data_dir / f"part{i}") for i in range(len(config.data.paths) or 1)]


def _damage(config: Config, data_dir: Path) -> str | None:
    """What is wrong with the prepared files in ``data_dir`` (None: intact)."""
    if config.data.tokenizer == "bpe" and not (data_dir / "tokenizer.json").is_file():
        return f"{data_dir / 'tokenizer.json'} is missing"
    try:
        for prefix in _part_prefixes(config, data_dir) if config.data.source != "indexed" else []:
            preprocess.check_indexed_dataset(prefix)
    except ValueError as err:
        return str(err)
    return None


def prepare(config: Config, run_dir: Path):
    """Tokenizer + indexed-dataset prefixes for the run; rank 0 writes, the others wait.
    The data is prepared into a directory named by its content fingerprint (reused when the
    inputs are unchanged).  Raises ValueError (before any training) for unreadable,
    out-of-vocabulary or truncated data, and for a split that leaves a part empty."""
    data_root = run_dir / "data"
    error = record = None
    if _is_rank0():
        try:
            for stale in data_root.glob(".tmp-*"):  # left by a preparation that was killed
                shutil.rmtree(stale, ignore_errors=True)
            record = fingerprint.describe(config)
            target = data_root / fingerprint.digest(record)[:16]
            damage = _damage(config, target) if target.is_dir() else None
            if damage:  # prepared data is derived: a damaged copy is rebuilt, not trained on
                print(f"prepared data damaged ({damage}); preparing it again", flush=True)
                shutil.rmtree(target)
            if not target.is_dir():
                _write_prepared(config, target, record)
            current = data_root / f".{CURRENT}.tmp"
            current.write_text(json.dumps({"dir": target.name, "record": record}, indent=1))
            os.replace(current, data_root / CURRENT)
        except Exception as err:  # any failure: the other ranks must hear of it, not wait
            error = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    if dist.is_initialized():  # every rank learns whether rank 0 succeeded
        box = [error, record]
        dist.broadcast_object_list(box, src=0)
        error, record = box
    if error:
        raise ValueError(error)
    return _open(config, data_root / fingerprint.digest(record)[:16])


def prepared_record(run_dir: Path) -> dict | None:
    """The data record of the run's latest :func:`prepare` (None for a run directory prepared
    before data records existed)."""
    current = run_dir / "data" / CURRENT
    return json.loads(current.read_text())["record"] if current.is_file() else None


def check_resume(saved: dict | None, current: dict, checkpoint: Path) -> None:
    """Refuse to resume from ``checkpoint`` (trained on data ``saved``) on other data."""
    if saved is None:  # a checkpoint that records no data: nothing to compare
        return
    if fingerprint.digest(saved) != fingerprint.digest(current):
        raise ValueError(
            f"checkpoint {checkpoint} was trained on other data: "
            + "; ".join(fingerprint.differences(saved, current))
            + ". Resume with the data it was trained on, or start a new run in another run_dir")


def _prepared_dir(run_dir: Path) -> Path:
    current = run_dir / "data" / CURRENT
    if current.is_file():
        return run_dir / "data" / json.loads(current.read_text())["dir"]
    return run_dir / "data"  # layout of runs prepared before content keying


def open_prepared(config: Config, run_dir: Path):
    """Tokenizer + indexed-dataset prefixes that :func:`prepare` wrote into ``run_dir``
    (reads only; for tools that analyse a finished run)."""
    return _open(config, _prepared_dir(run_dir))


def _open(config: Config, data_dir: Path):
    d = config.data
    if d.tokenizer == "bpe" and not (data_dir / "tokenizer.json").is_file():
        raise ValueError(f"{data_dir / 'tokenizer.json'} does not exist: not a prepared run")
    tokenizer = _tokenizer(config, data_dir)
    if d.source == "indexed":
        prefixes = list(d.paths)
        for p in prefixes:
            for ext in (".bin", ".idx"):
                if not Path(p + ext).is_file():
                    raise ValueError(f"data.paths: {p}{ext} does not exist")
    else:
        prefixes = _part_prefixes(config, data_dir)
        for p in prefixes:
            if not Path(p + ".idx").is_file():
                raise ValueError(f"{p}.idx does not exist: not a prepared run")
    for prefix, source in zip(prefixes, _sources(config)):
        check_split(preprocess.check_indexed_dataset(prefix), d.split, source)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}; raise model.vocab_size")
    return tokenizer, prefixes


def _tokenizer(config: Config, data_dir: Path):
    if config.data.tokenizer == "bpe":
        return JsonTokenizer(data_dir / "tokenizer.json")
    return load_tokenizer(config.data.tokenizer)


def build_datasets(config: Config, run_dir: Path, tokenizer, prefixes: list[str]):
    """(train, valid, test) Megatron GPT datasets over the blend of ``prefixes``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    t = config.train
    num_evals = (t.steps // t.eval_interval if t.eval_interval else 0) + 1
    sizes = [t.steps * t.global_batch_size, num_evals * t.eval_iters * t.global_batch_size,
             t.eval_iters * t.global_batch_size]
    weights = config.data.weights or None
    ds_config = GPTDatasetConfig(
        random_seed=config.data.seed,
        sequence_length=config.model.seq_length,
        blend=(prefixes, weights),
        split=config.data.split,
        path_to_cache=str(_prepared_dir(run_dir) / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, ds_config).build()


def micro_batches(dataset, first_sample: int, global_batch: int, micro_batch: int,
                  dp_rank: int, dp_size: int):
    """The micro-batches of this data-parallel rank for the global batch starting at
    ``first_sample``: dicts of [micro_batch, seq] tensors."""
    per_rank = global_batch // dp_size
    start = first_sample + dp_rank * per_rank
    for m in range(0, per_rank, micro_batch):
        samples = [dataset[(start + m + i) % len(dataset)] for i in range(micro_batch)]
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
               for key in ("tokens", "labels", "loss_mask", "position_ids")}
