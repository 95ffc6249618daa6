"""model.mla.rope_fusion: MLA's rotary embedding and the assembly of its keys and values as
Megatron-Core's fused Triton kernels (its YaRN path, at a scaling factor of 1) build the same
model as torch's RoPE ops: the same parameters, losses and gradients, on CPU in fp32 through
Triton's interpreter (which cannot run these kernels' bf16 math: bf16 is checked on a GPU, in
test_gpu_layer.py).  Auto turns it on with the Triton kernels where it applies; the config
refuses it by name where it cannot run; a checkpoint does not depend on it."""

import pytest
import torch

from megatron_coe.config import config_from_dict

def _config(rope_fusion, precision="fp32", device="cpu", overrides=(),
            transformer_overrides=None):
    return config_from_dict({
        "device": device, "precision": precision,
        "model": {"impl": "local", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "vocab_size": 64, "seq_length": 12, "attention": "mla",
                  "mla": {"kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4,
                          "v_head_dim": 8, "rope_fusion": rope_fusion},
                  "moe": {"num_experts": 4, "topk": 2, "expert_hidden_size": 16,
                          "shared_expert_hidden_size": 16},
                  "coe": {"iterations": 2},
                  "transformer_overrides": transformer_overrides or {}}}, overrides)


def _run(config, device):
    """(initial parameters, per-token losses, gradients) of one forward and backward."""
    from megatron_coe.model import build_model

    torch.manual_seed(0)
    model = build_model(config)
    params = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, 13), generator=g).to(device)
    positions = torch.arange(12, device=device).expand(2, 12)
    losses = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:])
    losses.float().mean().backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters()}
    return params, losses.detach().float().cpu(), grads


def check_rope_fusion_builds_the_same_model(device, precision, tol, monkeypatch, rope_dim=4):
    from megatron.core.transformer import multi_latent_attention as mla

    calls = []
    for name in ("fused_apply_mla_rope_for_q", "fused_apply_mla_rope_for_kv"):
        monkeypatch.setattr(mla, name, (lambda fn, name: lambda *a: (
            calls.append(name), fn(*a))[1])(getattr(mla, name), name))
    dims = [f"model.mla.qk_pos_emb_head_dim={rope_dim}"]
    p_ref, loss_ref, g_ref = _run(_config(False, precision, device, dims), device)
    assert not calls
    p, loss, g = _run(_config(True, precision, device, dims), device)
    assert calls == ["fused_apply_mla_rope_for_q", "fused_apply_mla_rope_for_kv"] * 2  # 2 layers
    from megatron.core.fusions import fused_mla_yarn_rope_apply as fused

    from megatron_coe.model.mla_rope import HEAD_BLOCK, KERNELS

    for name in KERNELS:  # pinned: one head block, the same sums in every process
        assert [c.kwargs["BLOCK_H"] for c in getattr(fused, name).configs] == [HEAD_BLOCK]
    assert p.keys() == p_ref.keys() and all(torch.equal(p[n], p_ref[n]) for n in p)
    torch.testing.assert_close(loss, loss_ref, rtol=tol, atol=tol)
    for n in g:
        scale = g_ref[n].abs().max().clamp_min(1e-6)
        assert (g[n] - g_ref[n]).abs().max() / scale <= tol, n


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("rope_dim", [4, 64])
def test_rope_fusion_builds_the_same_model(rope_dim, monkeypatch):
    """Under the interpreter too the kernels run with the pinned head block (8, more than the
    model's 4 heads: the head mask is exercised); Triton's autotuner would time the others on
    a GPU driver the interpreter has not.  At the paper configs' rotary dim of 64 one of YaRN's
    32 frequencies is one fp32 ulp from RoPE's (angles within 1e-6 rad over these positions):
    equal within float rounding, not bit for bit."""
    check_rope_fusion_builds_the_same_model("cpu", "fp32", 1e-6, monkeypatch, rope_dim)


def test_auto_follows_the_triton_kernels_where_the_fused_rope_applies():
    from megatron_coe.config import mla_rope_fusion

    pytest.importorskip("triton")
    assert mla_rope_fusion(_config(None, device="cuda"))
    assert not mla_rope_fusion(_config(None, device="cpu"))
    # on CPU not even with the Triton kernels (the tests' interpreter)
    assert not mla_rope_fusion(_config(None, overrides=["model.fused_kernels=triton",
                                                        "model.loss_fusion=true"]))
    for off in ("model.fused_kernels=compile", "model.mla.v_head_dim=12",
                "model.mla.qk_pos_emb_head_dim=6", "model.mla.qk_pos_emb_head_dim=2"):
        assert not mla_rope_fusion(_config(None, device="cuda", overrides=[off])), off
    # RoPE set by the transformer_overrides: the fused kernels' YaRN at 1 would not be it
    assert not mla_rope_fusion(_config(None, device="cuda",
                                       transformer_overrides={"mscale_all_dim": 1.0}))
    with pytest.raises(ValueError, match=r"rope_fusion=true: .*overrides\.mscale_all_dim"):
        _config(True, device="cuda", transformer_overrides={"mscale_all_dim": 1.0})


def test_auto_keeps_the_fused_rope_only_where_it_ran(monkeypatch, capsys):
    """On a GPU auto tries the kernels first (at the model's head dims): kept where they ran on
    every rank, else off, saying why."""
    from megatron_coe.model import build, mla_rope

    pytest.importorskip("triton")
    config = _config(None, device="cuda", overrides=["model.fused_kernels=triton",
                                                     "model.loss_fusion=true"])
    tried = []
    monkeypatch.setattr(mla_rope, "kernels_error",
                        lambda *shape: tried.append(shape) or "CompilationError: x")
    assert build.resolve_rope_fusion(config) == (
        False, "auto: the fused kernels failed on this GPU (CompilationError: x)")
    assert tried == [(torch.float32, 4, 8, 4, 8)]
    monkeypatch.setattr(mla_rope, "kernels_error", lambda *shape: None)
    assert build.resolve_rope_fusion(config)[0] is True
    monkeypatch.setattr(build, "_on_every_rank", lambda config, ok: False)
    monkeypatch.setattr(build, "triton_kernels_error", lambda *shape: None)
    resolved = build.resolved_kernels(config, announce=True)
    assert resolved.model.mla.rope_fusion is False
    assert "(auto: the fused kernels failed on another rank)" in capsys.readouterr().out


@pytest.mark.parametrize("override,why", [
    ("model.attention=mha", "model.attention=mha"),
    ("model.mla.qk_head_dim=12", "model.mla.qk_head_dim=12"),
    ("parallel.context=2", "parallel.context=2"),
])
def test_explicit_rope_fusion_is_refused_where_it_cannot_run(override, why):
    with pytest.raises(ValueError, match=f"rope_fusion=true: .*{why}"):
        _config(True, device="cuda", overrides=[override])


def test_explicit_rope_fusion_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs Triton kernels on a GPU"):
        _config(True)


def test_a_gpu_runs_config_loads_on_cpu_for_the_routing_tool(tmp_path):
    """A GPU run writes rope_fusion: true into its config.yaml; the routing tool reads it as one
    CPU process, where the fused kernels do not run."""
    from megatron_coe.config import dump_config, load_config
    from megatron_coe.tools.routing import ONE_CPU_PROCESS

    (tmp_path / "config.yaml").write_text(dump_config(_config(True, device="cuda")))
    config = load_config(tmp_path / "config.yaml", ONE_CPU_PROCESS)
    assert config.device == "cpu" and config.model.mla.rope_fusion is None


def test_checkpoints_do_not_depend_on_it():
    from megatron_coe.checkpoint import model_definition

    assert model_definition(_config(True, device="cuda")) == model_definition(_config(False))


def test_a_run_records_the_resolved_choice(capsys):
    from megatron_coe.model.build import resolved_kernels

    resolved = resolved_kernels(_config(None), announce=True)
    assert resolved.model.mla.rope_fusion is False
    assert "model.mla.rope_fusion: false (auto: on CUDA with model.fused_kernels=triton)" in (
        capsys.readouterr().out)
