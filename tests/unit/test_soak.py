"""The soak tool's own checks (no training: its torchrun calls are recorded, not run)."""

from pathlib import Path

from megatron_coe.config import load_config
from megatron_coe.tools import soak

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "coe.yaml")


def _record_runs(monkeypatch, steps):
    calls = []

    def fake_train(config, overrides, timeout):
        calls.append(overrides)
        return 0.0

    def fake_records(run_dir):  # every step logged, same loss: the comparison passes
        return {s: {"loss": 1.0, "mem_gib": 0.5} for s in range(1, steps + 1)}

    monkeypatch.setattr(soak, "_train", fake_train)
    monkeypatch.setattr(soak, "_records", fake_records)
    return calls


def test_short_soak_gives_a_schedule_megatron_accepts(tmp_path, monkeypatch):
    calls = _record_runs(monkeypatch, 50)
    assert soak.main(["--config", TINY, "--steps", "50", "--save-interval", "10",
                      "--out", str(tmp_path / "soak")]) == 0
    assert len(calls) == 3
    for overrides in calls:
        config = load_config(TINY, overrides)
        # Megatron's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps (= steps)
        assert config.schedule.warmup_steps < config.train.steps == 50
    # the two runs that must start fresh say so; only the second half resumes
    assert [next(x for x in o if x.startswith("checkpoint.resume=")) for o in calls] == [
        "checkpoint.resume=none", "checkpoint.resume=none", "checkpoint.resume=auto"]


def test_soak_into_a_used_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    calls = _record_runs(monkeypatch, 50)
    out = tmp_path / "soak"
    (out / "straight").mkdir(parents=True)
    (out / "soak.json").write_text("{}")
    assert soak.main(["--config", TINY, "--steps", "50", "--out", str(out)]) == 2
    assert calls == []
    assert "already holds a soak; give a new --out" in capsys.readouterr().err


def test_soak_fails_when_a_run_trained_nothing(tmp_path, monkeypatch, capsys):
    _record_runs(monkeypatch, 50)
    monkeypatch.setattr(soak, "_records", lambda run_dir: {})
    assert soak.main(["--config", TINY, "--steps", "50", "--out", str(tmp_path / "s")]) == 1
    assert "logged 0 of 50 steps" in capsys.readouterr().err
