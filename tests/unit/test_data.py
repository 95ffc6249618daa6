"""Data: preprocessing round trip, clear errors for bad data, tokenizers, the generator."""

import json
import re
from pathlib import Path

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


# --- run data: small datasets, content keying, damaged files ---------------------------------

TINY = "configs/tiny/coe.yaml"


def run_config(*overrides):
    from megatron_coe.config import load_config

    return load_config(TINY, ["parallel.expert=1", "train.steps=10", "train.eval_interval=0",
                              *overrides])


def jsonl_docs(path, num, tag=""):
    return write_jsonl(path, [{"text": f"Doc {tag}{i}: {i} + {i} = {2 * i}."} for i in range(num)])


@pytest.mark.parametrize("overrides,what,part", [
    (["data.source=jsonl", "data.paths=[{jsonl40}]"], "{jsonl40} has 40 documents", "test"),
    (["data.source=jsonl", "data.paths=[{jsonl60}]"], "{jsonl60} has 60 documents", "valid"),
    (["data.num_documents=40"], "data.num_documents=40 (source=arithmetic) has 40 documents",
     "test"),
])
def test_small_dataset_is_refused_before_megatron_builds_it(tmp_path, overrides, what, part):
    """Megatron's builder loops forever on an empty split part; prepare() refuses first."""
    import time

    from megatron_coe.data import dataset

    files = {"jsonl40": jsonl_docs(tmp_path / "d40.jsonl", 40),
             "jsonl60": jsonl_docs(tmp_path / "d60.jsonl", 60)}
    config = run_config(*[o.format(**files) for o in overrides])
    began = time.time()
    with pytest.raises(ValueError) as err:
        dataset.prepare(config, tmp_path / "run")
    message = str(err.value)
    assert message.startswith(what.format(**files) + ": data.split=98,1,1 leaves the "
                              f"{part} part empty"), message
    assert "use at least 76 documents" in message and "set data.split=" in message
    assert time.time() - began < 30


def test_documents_needed_and_suggested_split_really_work():
    from megatron_coe.data.dataset import _parts_ok, check_split

    assert not _parts_ok(75, "98,1,1") and all(_parts_ok(n, "98,1,1") for n in range(76, 2000))
    for n in (2, 3, 40, 60, 75):
        with pytest.raises(ValueError, match="set data.split=") as err:
            check_split(n, "98,1,1", "x")
        suggested = str(err.value).split("set data.split=")[1]
        assert _parts_ok(n, suggested), suggested
    check_split(76, "98,1,1", "x")
    check_split(11, "95,5,0", "x")  # a test part of weight 0 is never built


@pytest.mark.parametrize("split", ["100,0,0", "98,0,2"])
def test_split_without_validation_is_refused(split):
    with pytest.raises(ValueError, match=f"data.split='{split}' leaves no validation part"):
        run_config(f"data.split={split}")
    run_config("data.split=95,5,0")  # no test part is fine: the run never reads it


@pytest.mark.parametrize("num,split", [(200, "98,1,1"), (203, "90,7,3"), (77, "80,20,0")])
def test_split_ranges_are_megatrons(tmp_path, num, split):
    from megatron_coe.data import dataset

    config = run_config("data.source=jsonl", f"data.paths=[{jsonl_docs(tmp_path / 'd.jsonl', num)}]",
                        f"data.split={split}")
    built = dataset.build_datasets(config, tmp_path / "run",
                                   *dataset.prepare(config, tmp_path / "run"))
    for ds, rng in zip(built, dataset.split_ranges(num, split)):
        if rng is None:
            assert ds is None
        else:
            assert ds.indices.tolist() == list(range(*rng))


def _samples(path, run_dir, num_docs, tag):
    """Prepare ``num_docs`` documents written to ``path`` into ``run_dir``; the training
    samples Megatron's dataset gives (every sample of 10 steps)."""
    from megatron_coe.data import dataset

    jsonl_docs(path, num_docs, tag)
    config = run_config("data.source=jsonl", f"data.paths=[{path}]")
    train, _, _ = dataset.build_datasets(config, run_dir, *dataset.prepare(config, run_dir))
    return [train[i]["tokens"].tolist() for i in range(10 * config.train.global_batch_size)]


@pytest.mark.parametrize("before,after", [(300, 200), (200, 300)], ids=["shrunk", "grown"])
def test_edited_input_is_prepared_afresh(tmp_path, before, after):
    """Same path, same size settings, other content: the run trains on exactly what a fresh
    run of the new file trains on (Megatron's index cache must not be reused)."""
    src = tmp_path / "data.jsonl"
    old = _samples(src, tmp_path / "run", before, "a")
    new = _samples(src, tmp_path / "run", after, "b")
    assert new == _samples(src, tmp_path / "fresh", after, "b")
    assert new != old


def test_unchanged_input_reuses_the_prepared_data(tmp_path):
    from megatron_coe.data import dataset

    src = jsonl_docs(tmp_path / "d.jsonl", 100)
    config = run_config("data.source=jsonl", f"data.paths=[{src}]")
    _, (prefix,) = dataset.prepare(config, tmp_path / "run")
    stamp = Path(prefix + ".bin").stat().st_mtime_ns
    assert dataset.prepare(config, tmp_path / "run")[1] == [prefix]
    assert Path(prefix + ".bin").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "run" / "data").iterdir())) == 2  # current.json + one dir


def test_resume_on_changed_data_is_refused_naming_it(tmp_path):
    from megatron_coe.data import dataset, fingerprint

    src = jsonl_docs(tmp_path / "d.jsonl", 100)
    config = run_config("data.source=jsonl", f"data.paths=[{src}]")
    saved = fingerprint.describe(config)
    dataset.check_resume(saved, fingerprint.describe(config), Path("ckpt"))  # same data: fine
    jsonl_docs(src, 101)
    with pytest.raises(ValueError, match=f"checkpoint ckpt was trained on other data: {src} "
                                         r"changed \(sha256 "):
        dataset.check_resume(saved, fingerprint.describe(config), Path("ckpt"))
    with pytest.raises(ValueError, match=r"data split: \[0.98, 0.01, 0.01\] at the checkpoint"):
        dataset.check_resume(saved, fingerprint.describe(run_config(
            "data.source=jsonl", f"data.paths=[{src}]", "data.split=90,10,0")), Path("ckpt"))


def test_non_utf8_input_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at "
                                         r"column 14\)"):
        preprocess.read_jsonl(path, ["text"])


@pytest.mark.parametrize("trailing", ["/", ""])
def test_output_prefix_naming_a_directory_is_refused(tmp_path, capsys, trailing):
    src = jsonl_docs(tmp_path / "d.jsonl", 3)
    (tmp_path / "out").mkdir()
    prefix = str(tmp_path / "out") + trailing
    assert preprocess.main(["--input", str(src), "--output-prefix", prefix]) == 2
    assert f"--output-prefix {prefix} names a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]
    assert not any((tmp_path / "out").iterdir())


def test_cli_writes_exactly_what_it_reports(tmp_path, capsys):
    src = jsonl_docs(tmp_path / "d.jsonl", 3)
    assert preprocess.main(["--input", str(src), "--output-prefix", str(tmp_path / "o" / "t")]) == 0
    out = capsys.readouterr().out
    reported = out.split(" to ")[1].strip().split(" and ")
    assert reported == [str(tmp_path / "o" / "t.bin"), str(tmp_path / "o" / "t.idx")]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["t.bin", "t.idx"]


@pytest.mark.parametrize("ext,keep,message", [
    ("idx", 20, "is not a Megatron indexed-dataset index (bad or truncated header)"),
    ("idx", 100, "is truncated: 100 bytes, its header declares 50 sequences"),
    ("bin", 500, "is truncated: 500 bytes, its index ds.idx needs"),
])
def test_truncated_indexed_dataset_is_named_before_training(tmp_path, ext, keep, message):
    from megatron_coe.data import dataset

    preprocess.preprocess(jsonl_docs(tmp_path / "d.jsonl", 50), tmp_path / "ds", ByteTokenizer())
    f = tmp_path / f"ds.{ext}"
    f.write_bytes(f.read_bytes()[:keep])
    config = run_config("data.source=indexed", f"data.paths=[{tmp_path / 'ds'}]")
    with pytest.raises(ValueError, match=f"^{f} {re.escape(message)}"):
        dataset.prepare(config, tmp_path / "run")


def test_damaged_prepared_data_is_prepared_again(tmp_path, capsys):
    from megatron_coe.data import dataset

    src = jsonl_docs(tmp_path / "d.jsonl", 100)
    config = run_config("data.source=jsonl", f"data.paths=[{src}]")
    _, (prefix,) = dataset.prepare(config, tmp_path / "run")
    good = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(good[:100])
    assert dataset.prepare(config, tmp_path / "run")[1] == [prefix]
    assert f"prepared data damaged ({prefix}.bin is truncated" in capsys.readouterr().out
    assert Path(prefix + ".bin").read_bytes() == good
