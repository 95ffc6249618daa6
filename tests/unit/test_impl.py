"""model.impl (auto | transformer_engine | local): validation against the device and TE-only
features, start-up resolution with Transformer Engine present or absent (simulated through the
import system), and the resolved value in the run's config.yaml; checkpoint.save_final."""

import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from megatron_coe.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "coe.yaml")


@pytest.fixture
def te_present(monkeypatch):
    """Transformer Engine importable (an empty stand-in: resolution only imports it)."""
    te = types.ModuleType("transformer_engine")
    te.pytorch = types.ModuleType("transformer_engine.pytorch")
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te.pytorch)


@pytest.fixture
def te_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import raises ImportError


BAD = [
    (["model.impl=fast"], "model.impl='fast' is not valid; use one of auto, transformer_engine, "
                          "local"),
    (["model.impl=transformer_engine"], "model.impl=transformer_engine needs device=cuda"),
    (["device=cuda", "model.impl=local", "precision=bf16", "fp8.enabled=true"],
     "fp8.enabled=true with fp8.backend=transformer_engine needs Transformer Engine layers; model.impl=local"),
    (["device=cuda", "model.impl=local", "model.transformer_overrides={fp8_param: true}"],
     "model.transformer_overrides.fp8_param=True (FP8 parameters) needs Transformer Engine"),
    (["model.transformer_overrides={use_te_rng_tracker: true}"],
     "use_te_rng_tracker=True (TE's RNG tracker) needs Transformer Engine; the local spec "
     "(model.impl=auto, device=cpu)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_impl_settings_are_refused(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value)


def test_te_only_settings_pass_validation_where_te_may_be_used():
    load_config(TINY, ["device=cuda", "model.impl=transformer_engine", "precision=bf16",
                       "fp8.enabled=true"])
    load_config(TINY, ["device=cuda", "model.transformer_overrides={fp8_param: true}"])
    load_config(TINY, ["device=cuda", "model.impl=local",
                       "model.transformer_overrides={use_te_rng_tracker: false}"])


@pytest.mark.parametrize("impl", ["auto", "local"])
def test_cpu_is_always_local(te_present, impl):
    from megatron_coe.model import resolve_impl, use_transformer_engine

    config = load_config(TINY, [f"model.impl={impl}"])
    assert resolve_impl(config)[0] == "local"
    assert use_transformer_engine(config) is False


def test_auto_on_cuda_takes_te_when_importable(te_present):
    from megatron_coe.model import resolve_impl, use_transformer_engine

    config = load_config(TINY, ["device=cuda"])
    impl, why = resolve_impl(config)
    assert impl == "transformer_engine" and "importable" in why
    assert use_transformer_engine(config) is True
    local = load_config(TINY, ["device=cuda", "model.impl=local"])
    assert resolve_impl(local)[0] == "local" and not use_transformer_engine(local)


def test_auto_with_a_cuda_graph_of_moe_layers_takes_local_even_with_te(te_present):
    """train.cuda_graph captures the local spec's grouped experts, which keep the counts on the
    device; TE's grouped MLP reads them on the host."""
    from megatron_coe.model import resolve_impl

    paper = ROOT / "configs" / "paper" / "coe-2-4of64.yaml"
    config = load_config(paper, ["train.cuda_graph=full_iteration"])
    impl, why = resolve_impl(config)
    assert impl == "local" and "train.cuda_graph" in why
    assert resolve_impl(load_config(paper, []))[0] == "transformer_engine"


def test_auto_on_cuda_falls_back_to_local_without_te(te_absent, capsys):
    from megatron_coe.model import resolve_impl, use_transformer_engine, with_resolved_impl

    config = load_config(TINY, ["device=cuda"])
    impl, why = resolve_impl(config)
    assert impl == "local" and "Transformer Engine is not importable" in why
    assert use_transformer_engine(config) is False  # device=cuda no longer needs TE
    resolved = with_resolved_impl(config)
    assert resolved.model.impl == "local" and config.model.impl == "auto"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"model.impl: local ({why})"
    # no GPU here: auto SwiGLU fusion finds torch.compile cannot run and says so
    assert out[1].startswith("model.swiglu_fusion: false (auto: torch.compile failed on this GPU")
    assert resolved.model.swiglu_fusion is False
    # likewise auto's Triton kernels (and with them the fused loss), where triton is installed
    import importlib.util

    assert out[2].startswith("model.fused_kernels: compile, model.loss_fusion: false (auto: " + (
        "the Triton kernels failed on this GPU" if importlib.util.find_spec("triton")
        else "compile (no triton package"))
    assert (resolved.model.fused_kernels, resolved.model.loss_fusion) == ("compile", False)
    assert len(out) == 3


def test_named_te_or_te_only_features_without_te_stop_by_name(te_absent):
    from megatron_coe.model import resolve_impl

    with pytest.raises(ValueError, match="model.impl=transformer_engine but Transformer Engine "
                                         "is not importable here"):
        resolve_impl(load_config(TINY, ["device=cuda", "model.impl=transformer_engine"]))
    with pytest.raises(ValueError, match=r"fp8.enabled=true, model.transformer_overrides.fp8_param "
                                         r"needs Transformer Engine, which is not importable"):
        resolve_impl(load_config(TINY, ["device=cuda", "precision=bf16", "fp8.enabled=true",
                                        "model.transformer_overrides={fp8_param: true}"]))


def test_run_writes_resolved_impl_and_can_skip_final_checkpoint(tmp_path):
    """One process, one step: config.yaml says local (not auto), the log says why, and
    checkpoint.save_final=false leaves no checkpoint."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "megatron_coe.train", TINY, f"run_dir={run_dir}",
         "parallel.expert=1", "train.steps=1", "train.eval_iters=1", "schedule.warmup_steps=0",
         "checkpoint.save_final=false", "train.tensorboard=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "model.impl: local (device=cpu runs the local spec)" in done.stdout
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert written["model"]["impl"] == "local"
    assert written["checkpoint"]["save_final"] is False
    assert "no final checkpoint" in done.stdout
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
