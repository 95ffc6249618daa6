"""Datasets for a run: tokenizer, indexed data in the run directory, Megatron's GPT datasets,
and deterministic batches.

Sample order is a pure function of the step: step s (0-based) uses global samples
[s * G, (s + 1) * G) of the training dataset (G = global batch); data-parallel rank r takes the
r-th contiguous slice of G / dp samples, in micro-batches.  The data position saved in a
checkpoint is therefore just the step, and resume is exact.  Validation always reads the same
first ``eval_iters * G`` validation samples, so evaluations are comparable across a run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_coe.config import Config
from megatron_coe.data import arithmetic, preprocess
from megatron_coe.data.tokenizer import JsonTokenizer, load_tokenizer, train_bpe


def _split_weights(split: str) -> list[float]:
    return [float(x) for x in split.split(",")]


def _texts(config: Config) -> list[list[str]]:
    """The documents of each data path (arithmetic: one generated set)."""
    d = config.data
    if d.source == "arithmetic":
        return [arithmetic.documents(d.num_documents, d.seed)]
    return [preprocess.read_jsonl(p, d.text_keys) for p in d.paths]


def _train_part(texts: list[str], split: str) -> list[str]:
    """The leading training share of the documents (Megatron splits documents in order)."""
    w = _split_weights(split)
    return texts[: max(1, round(len(texts) * w[0] / sum(w)))]


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def prepare(config: Config, run_dir: Path):
    """Tokenizer + indexed-dataset prefixes for the run; rank 0 writes, the others wait.
    Raises ValueError (before any training) for unreadable or out-of-vocabulary data."""
    d = config.data
    data_dir = run_dir / "data"
    error = None
    if _is_rank0():
        try:
            texts = None if d.source == "indexed" else _texts(config)
            if d.tokenizer == "bpe":
                train_text = [t for docs in texts for t in _train_part(docs, d.split)]
                train_bpe(train_text, d.bpe_vocab_size, data_dir / "tokenizer.json")
            tokenizer = _tokenizer(config, data_dir)
            if texts is not None:
                for i, docs in enumerate(texts):
                    source = "arithmetic" if d.source == "arithmetic" else d.paths[i]
                    ids = preprocess.tokenize_documents(docs, tokenizer, source)
                    preprocess.write_indexed_dataset(ids, data_dir / f"part{i}",
                                                     tokenizer.vocab_size)
        except Exception as err:  # any failure: the other ranks must hear of it, not wait
            error = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    if dist.is_initialized():  # every rank learns whether rank 0 succeeded
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise ValueError(error)
    return open_prepared(config, run_dir)


def open_prepared(config: Config, run_dir: Path):
    """Tokenizer + indexed-dataset prefixes that :func:`prepare` wrote into ``run_dir``
    (reads only; for tools that analyse a finished run)."""
    d = config.data
    data_dir = run_dir / "data"
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
        prefixes = [str(data_dir / f"part{i}") for i in range(len(d.paths) or 1)]
        for p in prefixes:
            if not Path(p + ".idx").is_file():
                raise ValueError(f"{p}.idx does not exist: not a prepared run")
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
        path_to_cache=str(run_dir / "data" / "cache"),
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
