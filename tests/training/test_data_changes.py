"""Data problems found at start-up by a real coe-train: a dataset too small for the split is
refused on every rank in seconds (Megatron's builder used to loop forever), and a resume on
edited data is refused, naming the file, with the run directory left as it was."""

import json
import time

from runner import check, metrics, torchrun

BASE = ["parallel.expert=1", "train.steps=2", "schedule.warmup_steps=1", "train.eval_interval=0",
        "checkpoint.save_interval=0"]


def write_docs(path, num, tag):
    path.write_text("".join(json.dumps({"text": f"{tag} {i} + {i} = {2 * i}."}) + "\n"
                            for i in range(num)))
    return path


def test_small_dataset_is_refused_on_every_rank_in_seconds(tmp_path):
    src = write_docs(tmp_path / "d.jsonl", 40, "doc")
    began = time.time()
    result = torchrun([f"run_dir={tmp_path / 'run'}", *BASE, "data.source=jsonl",
                       f"data.paths=[{src}]"], nproc=2, timeout=240)
    assert result.returncode != 0
    assert (f"coe-train: {src} has 40 documents: data.split=98,1,1 leaves the test part empty"
            in result.stderr), result.stderr[-3000:]
    assert time.time() - began < 240


def test_resume_on_edited_data_is_refused_naming_the_file(tmp_path):
    src = write_docs(tmp_path / "d.jsonl", 200, "old")
    run = [f"run_dir={tmp_path / 'run'}", "data.source=jsonl", f"data.paths=[{src}]"]
    check(torchrun([*run, *BASE], nproc=1))
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    write_docs(src, 200, "new")
    result = torchrun([*run, *BASE, "train.steps=4"], nproc=1)
    assert result.returncode != 0
    assert (f"was trained on other data: {src} changed (sha256" in result.stderr
            ), result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ckpts
    assert max(metrics(tmp_path / "run")) == 2  # no step was trained on the new data
