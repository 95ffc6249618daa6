"""fp8.* validation: the Transformer Engine recipes that assume one call per module and step,
and the torch backend's prerequisites (docs/reliability.md, "FP8 with Transformer Engine")."""

from pathlib import Path

import pytest

from megatron_coe.config import expert_calls_per_microbatch, load_config

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny" / "coe.yaml")
GPU = ["device=cuda", "precision=bf16", "fp8.enabled=true"]


def test_tensorwise_is_the_default_recipe():
    config = load_config(TINY, GPU)
    assert config.fp8.recipe == "tensorwise" and config.fp8.backend == "transformer_engine"


@pytest.mark.parametrize("overrides,calls", [
    ([], 2),
    (["model.coe.iterations=3"], 3),
    (["parallel.overlap_expert_comm=true"], 4),
    (["model.coe=null", "parallel.overlap_expert_comm=true"], 2),
])
def test_delayed_scaling_is_refused_when_experts_run_more_than_once(overrides, calls):
    config = load_config(TINY, GPU + overrides)
    assert expert_calls_per_microbatch(config) == calls
    with pytest.raises(ValueError, match=f"fp8.recipe=delayed cannot scale CoE experts: they "
                                         f"run {calls} times per micro-batch"):
        load_config(TINY, GPU + overrides + ["fp8.recipe=delayed"])


@pytest.mark.parametrize("overrides", [["model.coe=null"], ["model.coe.iterations=1"]])
def test_delayed_scaling_is_kept_for_one_call_per_micro_batch(overrides):
    config = load_config(TINY, GPU + overrides + ["fp8.recipe=delayed"])
    assert expert_calls_per_microbatch(config) == 1


@pytest.mark.parametrize("overrides,message", [
    (["fp8.backend=torch", "model.moe.grouped_gemm=false"],
     "it needs model.moe with model.moe.grouped_gemm=true"),
    (["fp8.backend=torch", "model.moe.grouped_gemm=true", "fp8.format=e4m3",
      "fp8.recipe=delayed"], "fp8.recipe=delayed is a Transformer Engine recipe"),
    (["fp8.backend=torch", "model.moe.grouped_gemm=true"], "set fp8.format=e4m3"),
    (["fp8.backend=torch", "model.moe.grouped_gemm=true", "fp8.format=e4m3",
      "model.moe.expert_hidden_size=40"], "model.moe.expert_hidden_size=40 to be a multiple of 16"),
    (["fp8.backend=torch", "fp8.format=e4m3", "parallel.expert_tensor=2"],
     "which do not implement parallel.expert_tensor=2 (expert tensor parallelism): remove that "
     "setting, or use fp8.backend=transformer_engine"),
    (["fp8.backend=torch", "fp8.format=e4m3", "parallel.expert_tensor=2",
      "model.moe.grouped_gemm=false"], "use fp8.backend=transformer_engine"),
    (["fp8.recipe=rowwise"], "fp8.recipe=rowwise is the torch backend's"),
    (["fp8.backend=jax"], "fp8.backend='jax' is not valid"),
    (["precision=fp32"], "fp8.enabled=true runs on top of bf16"),
    (["device=cpu"], "fp8.enabled=true needs Transformer Engine on a GPU"),
])
def test_bad_fp8_settings_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config(TINY, GPU + overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_torch_backend_runs_on_grouped_experts_on_any_device(recipe):
    """On CPU where torch's CPU _scaled_mm takes scales per row (torch 2.14; not 2.11)."""
    from megatron_coe.model.fp8 import cpu_problem

    for device in ("cpu", "cuda"):
        overrides = GPU + [f"device={device}", "fp8.backend=torch", "model.moe.grouped_gemm=true",
                           "fp8.format=e4m3", f"fp8.recipe={recipe}"]
        if device == "cpu" and cpu_problem():
            with pytest.raises(ValueError, match="fp8.backend=torch cannot run on device=cpu"):
                load_config(TINY, overrides)
            continue
        assert load_config(TINY, overrides).fp8.backend == "torch"


def test_torch_backend_leaves_megatron_fp8_off_and_reaches_the_grouped_experts():
    """Megatron's fp8 settings mean Transformer Engine layers (fp8_autocast): off with the torch
    backend, whose recipe goes to the grouped experts instead."""
    from megatron_coe.model.build import expert_fp8_recipe, transformer_config

    config = load_config(TINY, GPU + ["fp8.backend=torch", "fp8.format=e4m3",
                                      "fp8.recipe=rowwise"])
    assert transformer_config(config).fp8 is None
    assert expert_fp8_recipe(config) == "rowwise"
    assert expert_fp8_recipe(load_config(TINY, GPU)) is None
