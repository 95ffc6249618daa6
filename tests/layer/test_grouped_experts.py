"""GroupedExperts (stacked weights, grouped GEMMs) against Megatron-Core's SequentialMLP: same
initial weights for the same seed; bit-identical outputs and gradients (rows, routing
probabilities, every expert's weights) in fp32 and bf16, through torch's grouped_mm and through
the per-expert fallback, for uneven and empty experts; the same state dict and the same sharded
(checkpoint) entries, and a real distributed-checkpoint save / load in both directions; the
whole CoE layer (shared expert, capacity dropping, expert recompute) equal to the layer with
LocalExperts; config validation of model.moe.grouped_gemm."""

import pytest
import torch

from experts_harness import E, FFN, H, local_submodules, run, tf_config
from megatron_coe.config import config_from_dict

COUNTS = [3, 0, 7, 1, 0, 5]  # uneven, two experts without rows


def build_pair(tf, dtype=torch.float32):
    """(SequentialMLP, GroupedExperts), each built from seed 0."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_coe.model.grouped_experts import GroupedExperts

    pg = get_default_pg_collection()
    torch.manual_seed(0)
    stock = SequentialMLP(E, tf, local_submodules(True), pg_collection=pg)
    torch.manual_seed(0)
    grouped = GroupedExperts(E, tf, local_submodules(True), pg_collection=pg)
    return stock.to(dtype), grouped.to(dtype)


def expert_grads(experts):
    """Every expert's (fc1, fc2) weight gradient, whichever module."""
    if hasattr(experts, "fc1_weight"):
        return [(experts.fc1_weight.grad[e], experts.fc2_weight.grad[e]) for e in range(E)]
    return [(m.linear_fc1.weight.grad, m.linear_fc2.weight.grad) for m in experts.local_experts]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_bit_identical_to_sequential_mlp(gated, dtype, backend, monkeypatch):
    from megatron_coe.model import grouped_experts

    stock, grouped = build_pair(tf_config(gated), dtype)
    # same seed, same initial weights: the stacks hold SequentialMLP's experts in order
    assert grouped.state_dict().keys() == stock.state_dict().keys()
    for (name, a), b in zip(grouped.state_dict().items(), stock.state_dict().values()):
        assert (a is None and b is None) or torch.equal(a, b), name
    if backend == "loop":
        monkeypatch.setattr(grouped_experts, "grouped_mm_op", lambda: None)
        grouped_experts._RUNS.clear()
    assert grouped._grouped(torch.zeros(1, H, dtype=dtype)) == (backend == "grouped_mm")
    torch.manual_seed(1)
    for counts in (COUNTS, [0] * E, [0, 0, 9, 0, 0, 0]):
        t = sum(counts)
        x, probs = torch.randn(t, H).to(dtype), torch.rand(t).to(dtype)
        gy = torch.randn(t, H)
        stock.zero_grad()
        grouped.zero_grad()
        want = run(stock, x, torch.tensor(counts), probs, gy)
        got = run(grouped, x, torch.tensor(counts), probs, gy)
        for name, a, b in zip(("output", "rows' grad", "probs' grad"), got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (name, counts)
        for e, (a, b) in enumerate(zip(expert_grads(grouped), expert_grads(stock))):
            for u, v in zip(a, b):
                if v is None:  # SequentialMLP never ran expert e (no rows, no graph)
                    v = torch.zeros_like(u)
                assert torch.equal(u, v), (e, counts)
    grouped_experts._RUNS.clear()


def test_unaligned_sizes_fall_back_to_the_loop():
    """F = 18 in fp32: 72-byte rows are not 16-byte multiples, which grouped_mm refuses; the
    per-expert loop runs instead.  Its expert slices then start off 16-byte boundaries, where
    CPU GEMM kernels may round differently from SequentialMLP's freshly allocated per-expert
    tensors: within 1e-6 relative (aligned sizes are bit-identical, above)."""
    from reference import max_rel_err

    stock, grouped = build_pair(tf_config(ffn=18))
    x = torch.randn(sum(COUNTS), H)
    assert not grouped._grouped(x)
    probs, gy = torch.rand(len(x)), torch.randn(len(x), H)
    for a, b in zip(run(grouped, x, torch.tensor(COUNTS), probs, gy),
                    run(stock, x, torch.tensor(COUNTS), probs, gy)):
        assert max_rel_err(a.detach(), b.detach()) <= 1e-6
    for a, b in zip(expert_grads(grouped), expert_grads(stock)):
        for u, v in zip(a, b):
            assert max_rel_err(u, torch.zeros_like(u) if v is None else v) <= 1e-6


def test_grouped_path_does_not_read_the_counts_on_the_host(monkeypatch):
    """Offsets come from tokens_per_expert by tensor ops: on a GPU no host sync (here: the
    counts tensor is never turned into a Python list)."""
    _, grouped = build_pair(tf_config())

    def no_host_copy(*_):
        raise AssertionError("tokens_per_expert read on the host")

    x = torch.randn(sum(COUNTS), H)
    monkeypatch.setattr(torch.Tensor, "tolist", no_host_copy)
    monkeypatch.setattr(torch.Tensor, "item", no_host_copy)
    y, _ = grouped(x, torch.tensor(COUNTS), torch.rand(len(x)))
    y.sum().backward()
    assert grouped.fc1_weight.grad is not None


def test_plain_state_dict_loads_both_ways():
    stock, grouped = build_pair(tf_config())
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_()
    grouped.load_state_dict(stock.state_dict())
    for e, m in enumerate(stock.local_experts):
        assert torch.equal(grouped.fc1_weight[e], m.linear_fc1.weight)
        assert torch.equal(grouped.fc2_weight[e], m.linear_fc2.weight)
    with torch.no_grad():
        grouped.fc2_weight.mul_(2)
    stock.load_state_dict(grouped.state_dict())
    assert torch.equal(stock.local_experts[3].linear_fc2.weight, grouped.fc2_weight[3])
    with pytest.raises(RuntimeError, match="experts"):
        grouped.load_state_dict({k: v for k, v in stock.state_dict().items()
                                 if "local_experts.2." not in k})


def _sharded_entries(module, prefix, offsets):
    """{(key, global offset): (global shape, local shape, replica id, data)} of everything
    ``module`` writes to a distributed checkpoint (factories built)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    out = {}
    for v in module.sharded_state_dict(prefix=prefix, sharded_offsets=offsets).values():
        pieces = v.build() if isinstance(v, ShardedTensorFactory) else v
        for sh in (x for p in (pieces if isinstance(pieces, list) else [pieces])
                   for x in (p if isinstance(p, list) else [p])):
            data = None if isinstance(sh, ShardedObject) else sh.data.clone()
            out[(sh.key, sh.global_offset)] = (sh.global_shape, getattr(sh, "local_shape", None),
                                               sh.replica_id, data)
    return out


@pytest.mark.parametrize("gated", [True, False])
def test_sharded_state_dict_is_sequential_mlps(gated):
    stock, grouped = build_pair(tf_config(gated))
    offsets = ((0, 1, 3),)  # e.g. layer 2 of 3 (pipeline axis)
    want = _sharded_entries(stock, "decoder.layers.mlp.experts.", offsets)
    got = _sharded_entries(grouped, "decoder.layers.mlp.experts.", offsets)
    assert got.keys() == want.keys()
    for key, (shape, local, replica, data) in want.items():
        g = got[key]
        assert g[:3] == (shape, local, replica), key
        assert (data is None and g[3] is None) or torch.equal(g[3], data), key


def test_distributed_checkpoint_interchanges(tmp_path):
    """dist_checkpointing.save of one module, load into the other, both directions; the
    optimizer-state path (the factory rebuilt on another tensor under another key) too."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    stock, grouped = build_pair(tf_config())
    with torch.no_grad():
        for p in [*stock.parameters(), *grouped.parameters()]:
            p.normal_()

    def save(module, path):
        path.mkdir()
        dist_checkpointing.save(module.sharded_state_dict(prefix="experts."), str(path))

    def load(module, path):
        loaded = dist_checkpointing.load(module.sharded_state_dict(prefix="experts."), str(path))
        module.load_state_dict({k[len("experts."):]: v for k, v in loaded.items()})

    save(stock, tmp_path / "sequential")
    load(grouped, tmp_path / "sequential")
    for e, m in enumerate(stock.local_experts):
        assert torch.equal(grouped.fc1_weight[e], m.linear_fc1.weight)
        assert torch.equal(grouped.fc2_weight[e], m.linear_fc2.weight)
    with torch.no_grad():
        grouped.fc1_weight.add_(1)
    save(grouped, tmp_path / "grouped")
    load(stock, tmp_path / "grouped")
    assert torch.equal(stock.local_experts[5].linear_fc1.weight, grouped.fc1_weight[5])

    # an optimizer state shaped like the stack, under the optimizer's key prefix
    factory = grouped.sharded_state_dict(prefix="experts.")["experts.fc1_weight"]
    moment = torch.randn_like(grouped.fc1_weight)
    state = {"m": make_sharded_optimizer_tensor(factory, moment, "optimizer.state.exp_avg")}
    (tmp_path / "optim").mkdir()
    dist_checkpointing.save(state, str(tmp_path / "optim"))
    template = {"m": make_sharded_optimizer_tensor(factory, torch.zeros_like(moment),
                                                   "optimizer.state.exp_avg")}
    assert torch.equal(dist_checkpointing.load(template, str(tmp_path / "optim"))["m"], moment)


def layer_config(grouped, iterations=2, capacity_factor=None, recompute="none"):
    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": 8, "topk": 2, "expert_hidden_size": FFN,
                          "shared_expert_hidden_size": 16, "capacity_factor": capacity_factor,
                          "grouped_gemm": grouped},
                  "coe": {"iterations": iterations}},
        "train": {"recompute": recompute},
    })


@pytest.mark.parametrize("iterations,capacity_factor,recompute",
                         [(2, None, "none"), (3, 0.5, "none"), (2, None, "experts")],
                         ids=["coe2", "coe3-capacity0.5", "coe2-expert-recompute"])
def test_layer_with_grouped_experts_equals_local_experts(iterations, capacity_factor, recompute):
    """The whole CoE layer, experts grouped or per expert (LocalExperts): same parameters from
    the same seed, same bits out and back (capacity 0.5 drops tokens)."""
    from megatron_coe.model import build_moe_layer
    from megatron_coe.model.experts import LocalExperts
    from megatron_coe.model.grouped_experts import GroupedExperts

    layers = []
    for grouped in (False, True):
        torch.manual_seed(0)
        layers.append(build_moe_layer(layer_config(grouped, iterations, capacity_factor,
                                                   recompute)))
    loop, grouped = layers
    assert type(loop.experts) is LocalExperts and type(grouped.experts) is GroupedExperts
    for (name, a), b in zip(grouped.state_dict().items(), loop.state_dict().values()):
        assert (a is None and b is None) or torch.equal(a, b), name
    torch.manual_seed(1)
    x, gy = torch.randn(6, 3, H), torch.randn(6, 3, H)
    results = []
    for layer in layers:
        xs = x.clone().requires_grad_(True)
        y, _ = layer(xs)
        (y * gy).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if "experts.local" not in n
                 and "fc1_weight" not in n and "fc2_weight" not in n}
        results.append((y, xs.grad, grads, expert_grads(layer.experts)))
    (y0, gx0, g0, e0), (y1, gx1, g1, e1) = results
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    for a, b in zip(e1, e0):
        for u, v in zip(a, b):
            assert torch.equal(u, torch.zeros_like(u) if v is None else v)


def test_megatron_spec_builder_takes_the_flag():
    """moe_grouped_gemm=True on the local spec: Megatron's own builder still gives
    SequentialMLP (it ignores the flag there); ours gives GroupedExperts."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_coe.model import build_moe_layer
    from megatron_coe.model.grouped_experts import GroupedExperts

    stock = build_moe_layer(layer_config(True), stock_megatron=True)
    assert stock.config.moe_grouped_gemm and type(stock.experts) is SequentialMLP
    assert type(build_moe_layer(layer_config(True)).experts) is GroupedExperts


def test_grouped_gemm_setting():
    from megatron_coe.config import grouped_experts

    def make(grouped, *overrides, transformer_overrides=None):
        return config_from_dict({
            "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                      "moe": {"num_experts": 8, "topk": 2, "grouped_gemm": grouped},
                      "transformer_overrides": transformer_overrides or {}}}, overrides)

    bias = {"add_bias_linear": True}
    assert grouped_experts(make(True)) and not grouped_experts(make(False))
    assert grouped_experts(make(None, "device=cuda"))
    # auto on CPU: grouped wherever the grouped experts apply, LocalExperts elsewhere
    assert grouped_experts(make(None))
    assert not grouped_experts(make(None, "parallel.expert_tensor=2"))
    assert not grouped_experts(make(None, transformer_overrides=bias))
    with pytest.raises(ValueError, match="parallel.expert_tensor=2.*grouped_gemm=false"):
        make(True, "parallel.expert_tensor=2")
    with pytest.raises(ValueError, match="add_bias_linear.*grouped_gemm=false"):
        make(True, transformer_overrides=bias)


def test_torch_fp8_backend_runs_every_iteration_in_fp8(monkeypatch):
    """fp8.backend=torch: a CoE-2 layer's grouped experts run both linears through the FP8
    grouped GEMM in every iteration (2 calls per iteration), and the layer's output and every
    expert weight gradient stay within FP8 error of the same layer in bf16 (same weights)."""
    from megatron_coe.model import build_moe_layer, fp8

    if fp8.cpu_problem():
        pytest.skip(fp8.cpu_problem())

    def config(fp8_on):
        return config_from_dict({
            "precision": "bf16",
            "fp8": {"enabled": fp8_on, "backend": "torch", "format": "e4m3",
                    "recipe": "rowwise"},
            "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                      "moe": {"num_experts": 8, "topk": 2, "expert_hidden_size": 32,
                              "shared_expert_hidden_size": 16, "aux_loss": "none"},
                      "coe": {"iterations": 2}}})

    torch.manual_seed(0)
    ref = build_moe_layer(config(False))
    torch.manual_seed(0)
    quant = build_moe_layer(config(True))
    quant.load_state_dict(ref.state_dict())
    assert quant.experts.fp8_recipe == "rowwise" and ref.experts.fp8_recipe is None
    calls = []
    real = fp8.fp8_grouped_linear
    monkeypatch.setattr(fp8, "fp8_grouped_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(8, 2, 32, dtype=torch.bfloat16)
    outs = []
    for layer in (ref, quant):
        y, _ = layer(x)
        y.float().square().sum().backward()
        outs.append((y.detach().float(), layer.experts.fc1_weight.grad.float(),
                     layer.experts.fc2_weight.grad.float()))
    assert len(calls) == 2 * 2
    for a, b in zip(*outs):
        assert torch.isfinite(b).all() and b.abs().sum() > 0
        assert (a - b).norm() <= 0.1 * a.norm(), ((a - b).norm() / a.norm()).item()
