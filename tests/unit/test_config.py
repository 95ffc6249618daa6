"""Config loading and validation: strict keys, safe YAML, overrides, one clear ValueError per
bad value, raised before any process group exists."""

from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_coe.config import config_from_dict, dump_config, load_config

TINY = "configs/tiny/coe.yaml"


def test_tiny_config_loads_and_roundtrips(tmp_path):
    config = load_config(TINY)
    assert config.model.coe.iterations == 2 and config.parallel.expert == 2
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_dotted_overrides_parse_yaml_scalars():
    config = load_config(TINY, ["model.coe.iterations=3", "model.moe.capacity_factor=1.25",
                                "model.coe.residual=outer", "run_dir=/tmp/x",
                                "model.moe.shared_expert_hidden_size=null"])
    assert config.model.coe.iterations == 3
    assert config.model.moe.capacity_factor == 1.25
    assert config.model.coe.residual == "outer"
    assert config.run_dir == "/tmp/x"
    assert config.model.moe.shared_expert_hidden_size is None


def test_floats_in_exponent_notation_are_read_as_floats(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; a float field takes it as the number."""
    path = tmp_path / "c.yaml"
    path.write_text(Path(TINY).read_text().replace("lr: 0.003", "lr: 3e-3"))
    config = load_config(path, ["optimizer.initial_loss_scale=1e12"])
    assert config.optimizer.lr == 0.003 and config.optimizer.initial_loss_scale == 1e12


def test_override_creates_missing_section():
    config = config_from_dict({"model": {"moe": {"num_experts": 4}}}, ["model.coe.iterations=2"])
    assert config.model.coe.iterations == 2 and config.model.coe.residual == "inner"


BAD = [
    ({"model.coe.iterations": 0}, "model.coe.iterations=0 must be >= 1"),
    ({"model.moe.topk": 9}, "model.moe.topk=9 exceeds model.moe.num_experts=8"),
    ({"parallel.expert": 3}, "not divisible by the expert-parallel size parallel.expert=3"),
    ({"model.coe.residual": "sideways"}, "model.coe.residual='sideways' is not valid"),
    ({"model.coe.router": "random"}, "model.coe.router='random' is not valid"),
    ({"model.moe": None}, "model.coe is set on a dense model"),
    ({"model.moe.aux_loss": "kl"}, "model.moe.aux_loss='kl' is not valid"),
    ({"model.moe.capacity_factor": -1.0}, "model.moe.capacity_factor=-1.0 must be > 0"),
    ({"model.moe.pad_to_capacity": True}, "pad_to_capacity needs model.moe.capacity_factor"),
    ({"model.num_attention_heads": 5}, "must be divisible by model.num_attention_heads=5"),
    ({"device": "tpu"}, "device='tpu' is not valid"),
    ({"optimizer.min_loss_scale": 1e6}, "optimizer.min_loss_scale=1000000.0 exceeds"),
    ({"optimizer.loss_scale": 1024.0}, "precision=fp32 does not scale the loss"),
    ({"optimizer.lr": "fast"}, "optimizer.lr: expected float, got 'fast'"),
    ({"parallel.overlap_expert_comm": True, "model.moe.num_experts": 2},
     "leaves 1 per rank: use at least 2 per rank"),
    ({"parallel.overlap_expert_comm": True, "model.moe.capacity_factor": 1.0,
      "model.moe.pad_to_capacity": True}, "does not support"),
    ({"parallel.context": 3}, "model.seq_length=64 must be divisible by 2 x parallel.context"),
    ({"parallel.tensor": 2}, "needs parallel.sequence_parallel=true"),
    ({"model.transformer_overrides": {"moe_shared_expert_overlap": True}},
     "moe_shared_expert_overlap cannot be used: the CoE layer runs the shared expert"),
    ({"model.transformer_overrides": {"moe_shared_expert_overlap": True},
      "model.coe.iterations": 1}, "moe_shared_expert_overlap cannot be used"),
    ({"model.transformer_overrides": {"delay_wgrad_compute": True}},
     "delay_wgrad_compute cannot be used with model.coe.iterations=2"),
    ({"model.transformer_overrides": {"cuda_graph_impl": "local"}}, "cuda_graph_impl='local'"),
    ({"model.transformer_overrides": {"cuda_graph_impl": "full_iteration"}},
     "set train.cuda_graph: full_iteration instead"),
    ({"model.transformer_overrides": {"not_a_field": 1}}, "not a Megatron TransformerConfig field"),
    ({"train.cuda_graph": "layers"}, "train.cuda_graph='layers' is not valid"),
    ({"train.cuda_graph": "full_iteration"}, "captures CUDA kernels; device=cpu has none"),
    ({"device": "cuda", "train.cuda_graph": "full_iteration", "parallel.expert": 2},
     "reads each rank's token counts on the host"),
    ({"device": "cuda", "precision": "fp16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1},
     "dynamic loss scaler replaces its scale tensor"),
    ({"device": "cuda", "precision": "bf16", "fp8.enabled": True, "parallel.expert": 1,
      "train.cuda_graph": "full_iteration"}, "FP8 scaling state"),
    ({"device": "cuda", "train.cuda_graph": "full_iteration", "parallel.pipeline": 2,
      "parallel.expert": 1},
     "is supported on one pipeline stage"),
    ({"train.cuda_graph_warmup_steps": 0}, "train.cuda_graph_warmup_steps=0 must be > 0"),
    ({"device": "cuda", "train.cuda_graph": "full_iteration", "parallel.expert": 1},
     "with MoE layers needs precision=bf16: in fp32 torch's grouped GEMM"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "model.impl": "transformer_engine"},
     "Transformer Engine's grouped MLP reads the expert splits on the host"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "model.moe.grouped_gemm": False},
     "per-expert GEMMs split the rows by counts read on the host"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "model.transformer_overrides": {"add_bias_linear": True}},
     "they do not implement model.transformer_overrides.add_bias_linear"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "model.moe.expert_hidden_size": 60},
     "multiples of 8 for torch's grouped GEMM (model.moe.expert_hidden_size=60)"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "model.moe.capacity_factor": 1.5},
     "Megatron's dispatcher reads the kept token counts on the host"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "train.recompute": "full",
      "model.transformer_overrides": {"hidden_dropout": 0.1}},
     "with dropout and train.recompute=full would recompute other masks"),
    ({"model.coe.iterations": "two"}, "model.coe.iterations: expected int, got 'two'"),
    ({"model.dense_layers": [5]}, "model.dense_layers contains 5"),
    ({"model.moe.expert_bias": True}, "needs model.moe.score_function=sigmoid"),
    # non-finite floats, in any float field (YAML reads .inf / .nan as floats)
    ({"optimizer.lr": float("inf")}, "optimizer.lr=inf is not a finite number"),
    ({"parallel.timeout_minutes": float("inf")}, "parallel.timeout_minutes=inf is not a finite"),
    ({"optimizer.min_lr": float("nan")}, "optimizer.min_lr=nan is not a finite number"),
    ({"model.moe.capacity_factor": float("inf")}, "model.moe.capacity_factor=inf is not a finite"),
    ({"data.source": "jsonl", "data.paths": ["a", "b"], "data.weights": [1.0, float("-inf")]},
     "data.weights[1]=-inf is not a finite number"),
    ({"model.coe.iterations": 1, "model.coe.iteration_norm": True},
     "model.coe.iteration_norm=true norms the input of iterations 2..C"),
    ({"train.profile_steps": [3]}, "train.profile_steps=[3]: give [first, last]"),
    ({"train.profile_steps": [0, 2]}, "with 1 <= first <= last <= train.steps=40"),
    ({"train.profile_steps": [3, 2]}, "train.profile_steps=[3, 2]: give [first, last]"),
    ({"train.profile_steps": [39, 41]}, "last <= train.steps=40 (e.g. [10, 12])"),
    ({"train.profile_ranks": []}, "train.profile_ranks=[]: give distinct ranks >= 0"),
    ({"train.profile_ranks": [0, 0]}, "train.profile_ranks=[0, 0]: give distinct ranks"),
    ({"device": "cuda", "precision": "bf16", "train.cuda_graph": "full_iteration",
      "parallel.expert": 1, "train.profile_steps": [3, 4]},
     "step 3 captures the graph, which the profiler must not observe; start after it"),
    # Megatron's scheduler asserts lr_warmup_steps < lr_decay_steps (= train.steps)
    ({"schedule.warmup_steps": 40}, "schedule.warmup_steps=40 must be in [0, train.steps=40)"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_values_raise_clear_errors(overrides, message):
    import yaml

    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in overrides.items()]
    with pytest.raises(ValueError) as err:
        load_config(TINY, items)
    assert message in str(err.value)
    assert not dist.is_initialized()


@pytest.mark.parametrize("item", ["train.steps=[1,", "model.coe.residual=a: b: c",
                                  "optimizer.lr={"])
def test_override_with_bad_yaml_is_named(item):
    with pytest.raises(ValueError) as err:
        load_config(TINY, [item])
    assert str(err.value).startswith(f"override {item!r}: the value ")
    assert "is not valid YAML" in str(err.value)


def test_warmup_rule_matches_megatron_scheduler():
    """The largest warmup validation accepts builds Megatron's scheduler; one more is refused."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = load_config(TINY, ["schedule.warmup_steps=39"])
    assert config.train.steps == 40

    class _Opt:
        param_groups = [{"lr": 0.0}]

    OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=39,
                            lr_decay_steps=40, lr_decay_style="cosine", start_wd=0.0,
                            end_wd=0.0, wd_incr_steps=40, wd_incr_style="constant")
    with pytest.raises(ValueError, match="warmup_steps=40 must be in"):
        load_config(TINY, ["schedule.warmup_steps=40"])


def test_unknown_keys_list_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hidden: 64\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) model.hidden; valid keys of model: "
                                         r"num_layers, hidden_size"):
        load_config(path)
    with pytest.raises(ValueError, match="unknown key model.coe.iters"):
        load_config(TINY, ["model.coe.iters=2"])


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_world_size_check_prints_every_factor():
    from megatron_coe.config import validate

    config = load_config(TINY, ["parallel.expert=4", "model.moe.num_experts=8"])
    with pytest.raises(ValueError, match=r"world size 2 is not divisible by expert_tensor \(1\) x "
                                         r"expert \(4\) x pipeline \(1\) = 4"):
        validate(config, world_size=2)


def test_profile_ranks_outside_the_world_are_refused():
    from megatron_coe.config import validate

    config = load_config(TINY, ["train.profile_steps=[2,3]", "train.profile_ranks=[0,2]",
                                "train.micro_batch_size=2"])
    validate(config, world_size=4)
    with pytest.raises(ValueError, match=r"train.profile_ranks=\[0, 2\]: this run has ranks 0..1"):
        validate(config, world_size=2)


def test_smoke_entry_point_fails_before_any_process_group(monkeypatch, capsys):
    from megatron_coe import smoke

    def forbidden(*args, **kwargs):
        raise AssertionError("a process group was created for a bad config")

    monkeypatch.setattr(dist, "init_process_group", forbidden)
    assert smoke.main([TINY, "model.moe.topk=99"]) == 2
    assert "model.moe.topk=99 exceeds" in capsys.readouterr().err


def test_torch_fp8_on_a_cpu_without_rowwise_scaled_mm_is_refused(monkeypatch):
    """fp8.backend=torch on device=cpu where torch's CPU _scaled_mm takes one scale per operand
    (torch 2.11): refused at the config, naming the reason, not an internal assert mid-step."""
    from megatron_coe.model import fp8

    fp8_torch = {"precision": "bf16", "fp8": {"enabled": True, "backend": "torch",
                                              "format": "e4m3", "recipe": "rowwise"},
                 "model": {"hidden_size": 64, "moe": {"expert_hidden_size": 32}}}
    monkeypatch.setattr(fp8, "cpu_problem", lambda: "torch X's CPU _scaled_mm takes no scale")
    with pytest.raises(ValueError, match="fp8.backend=torch cannot run on device=cpu with this "
                                         "torch: torch X's CPU _scaled_mm takes no scale"):
        config_from_dict(fp8_torch)
    monkeypatch.setattr(fp8, "cpu_problem", lambda: None)
    assert config_from_dict(fp8_torch).fp8.backend == "torch"
