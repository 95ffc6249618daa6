"""The LR schedules Megatron's scheduler gives for our config, and data blending."""

import json

import pytest

from megatron_coe.config import load_config

TINY = "configs/tiny/coe.yaml"


def lrs(overrides, steps=20):
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model

    config = load_config(TINY, ["parallel.expert=1", f"train.steps={steps}", *overrides])
    model = wrap_model(config, build_model(config))
    optimizer, scheduler = build_optimizer(config, model)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return out


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_warmup_then_decay(decay):
    extra = ["schedule.wsd_decay_steps=5"] if decay == "wsd" else []
    lr = lrs([f"schedule.decay={decay}", "schedule.warmup_steps=4", "optimizer.lr=0.01",
              "optimizer.min_lr=0.001", *extra])
    assert lr[:5] == pytest.approx([0.0, 0.0025, 0.005, 0.0075, 0.01])  # linear warmup
    if decay == "constant":
        assert lr[4:] == pytest.approx([0.01] * 16)
    elif decay == "wsd":
        assert lr[4:15] == pytest.approx([0.01] * 11)  # stable until the last 5 steps
        assert all(a > b for a, b in zip(lr[15:], lr[16:]))
    else:
        assert all(a > b for a, b in zip(lr[4:], lr[5:]))
        assert lr[-1] > 0.001 and lr[-1] < 0.0025


def test_blend_of_two_jsonl_sources(tmp_path):
    from pathlib import Path

    from megatron_coe.data import dataset

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "A" * 80}) + "\n" for _ in range(200)))
    b.write_text("".join(json.dumps({"text": "B" * 80}) + "\n" for _ in range(200)))
    config = load_config(TINY, ["parallel.expert=1", "data.source=jsonl",
                                f"data.paths=[{a},{b}]", "data.weights=[3,1]",
                                "train.steps=50", "train.eval_interval=0"])
    from megatron_coe import parallel

    parallel.initialize(config)
    tokenizer, prefixes = dataset.prepare(config, Path(tmp_path / "run"))
    train, valid, _ = dataset.build_datasets(config, Path(tmp_path / "run"), tokenizer, prefixes)
    counts = {"A": 0, "B": 0}
    for i in range(400):
        tokens = train[i]["tokens"].tolist()
        counts["A"] += tokens.count(ord("A"))
        counts["B"] += tokens.count(ord("B"))
    share = counts["A"] / (counts["A"] + counts["B"])
    assert 0.7 < share < 0.8, counts  # 3:1 blend
