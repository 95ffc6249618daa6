"""Data: preprocessing round trip, clear errors for bad data, tokenizers, the generator."""

import json

import numpy as np
import pytest

from megatron_coe.data import arithmetic, preprocess
from megatron_coe.data.tokenizer import ByteTokenizer, JsonTokenizer, train_bpe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_round_trip_text_indexed_tokens_text(tmp_path, tokenizer):
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "Ünïcödé apples: 7 x 3?", "answer": "7 x 3 = 21\n#### 21"}]
    src = write_jsonl(tmp_path / "data.jsonl", rows)
    tok = ByteTokenizer() if tokenizer == "byte" else train_bpe(
        arithmetic.documents(200, 0) + [r["question"] + "\n" + r["answer"] for r in rows],
        400, tmp_path / "tok.json")
    n = preprocess.preprocess(src, tmp_path / "out" / "data", tok, ["question", "answer"])
    assert n == 2
    docs = preprocess.read_indexed_dataset(tmp_path / "out" / "data")
    assert len(docs) == 2
    for doc, row in zip(docs, rows):
        assert doc[-1] == tok.eod
        assert tok.detokenize(doc[:-1].tolist()) == row["question"] + "\n" + row["answer"]


def test_cli_reports_bad_lines_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert preprocess.main(["--input", str(bad), "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()


@pytest.mark.parametrize("content,message", [
    ("", "no documents (the file is empty)"),
    ("\n\n", "no documents (the file is empty)"),
    ('[1, 2]\n', ":1: expected a JSON object, got list"),
    ('{"text": "a"}\n{"body": "b"}\n', ":2: field 'text' is missing or not a string"),
    ('{"text": 5}\n', ":1: field 'text' is missing or not a string"),
])
def test_bad_data_is_named(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preprocess.read_jsonl(path, ["text"])


def test_tokens_outside_vocabulary_are_refused(tmp_path):
    class Broken(ByteTokenizer):
        def tokenize(self, text):
            return [1, 2, 999]

    with pytest.raises(ValueError, match="document 1 has token id 999 outside the vocabulary"):
        preprocess.tokenize_documents(["x"], Broken(), "src.jsonl")


def test_existing_dataset_survives_a_failed_preprocess(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "hello"}])
    preprocess.preprocess(good, tmp_path / "ds", ByteTokenizer())
    before = (tmp_path / "ds.bin").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError):
        preprocess.preprocess(bad, tmp_path / "ds", ByteTokenizer())
    assert (tmp_path / "ds.bin").read_bytes() == before


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        JsonTokenizer(tmp_path / "missing.json")
    junk = tmp_path / "junk.json"
    junk.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="not a tokenizers JSON file"):
        JsonTokenizer(junk)


def test_arithmetic_generator_is_seeded_and_correct():
    a, b = arithmetic.documents(50, 7), arithmetic.documents(50, 7)
    assert a == b and a != arithmetic.documents(50, 8)
    for doc in a:  # every worked line is true arithmetic and the answer is the last result
        lines = doc.split("\nAnswer: ")[1].split("\n")
        result = None
        for line in lines[:-1]:
            lhs, rhs = line.split(" = ")
            x, op, y = lhs.split(" ")
            value = {"+": int(x) + int(y), "-": int(x) - int(y), "x": int(x) * int(y)}[op]
            assert value == int(rhs) and (result is None or int(x) == result)
            result = value
        assert lines[-1] == f"#### {result}"


def test_micro_batches_partition_the_global_batch():
    from megatron_coe.data.dataset import micro_batches

    class Fake:
        def __len__(self):
            return 1000

        def __getitem__(self, i):
            return {k: np.full(4, i) for k in ("tokens", "labels", "loss_mask", "position_ids")}

    seen = []
    for rank in range(2):
        for mb in micro_batches(Fake(), 16, 8, 2, rank, 2):
            seen += mb["tokens"][:, 0].tolist()
    assert seen == list(range(16, 24))
