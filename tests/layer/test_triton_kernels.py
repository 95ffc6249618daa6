"""model.fused_kernels=triton: the hand-written Triton kernels, run on CPU through Triton's
interpreter (TRITON_INTERPRET=1, the conftest's ``triton_interpreter``), equal what they replace
within float rounding:

- the loss (model/triton_cross_entropy.py): Megatron's vocabulary-parallel cross entropy and the
  compiled kernels, loss and logits gradient, fp32 and bf16, for vocabularies of one and of
  several blocks (not powers of two) and targets outside the vocabulary (a model built with it
  gives Megatron's loss and gradients: tests/layer/test_loss_fusion.py);
- the experts' SwiGLU (model/triton_swiglu.py): Megatron's fused weighted SwiGLU (routed experts)
  and fused SwiGLU (shared expert), output and gradients, for widths of one and of several
  column steps and row counts that are not multiples of a block; a CoE layer with them (grouped
  experts, model/shared_expert.py) equals one with Megatron's kernels, keeps the same tensors
  for backward, and gives the same bits under moe_act recompute;
- the sums over each token's expert rows (model/triton_gather_sum.py): bit for bit the fp32
  sum in the rows' order, in fp32 and bf16 (rounded as torch rounds), with inf and NaN, and
  within one rounding of torch's gather and sum; a CoE layer runs them;
- a CoE layer runs the routers' kernel too (model/triton_router.py; its own tests:
  tests/layer/test_triton_router.py);
- the config accepts it where it runs and refuses it by name where it cannot run or would replace
  nothing;
- Triton compiles every kernel for an H100 without register spills (offline, no GPU).

The interpreter checks the kernels' math and indexing, not their speed or Triton's GPU code
generation.  On a machine with a GPU the kernel-level comparisons run on CUDA too (``gpu``
marks), and the GPU check's part (a) runs a model with them."""

import math
from pathlib import Path

import pytest
import torch

from layer_harness import fwd_bwd, layer_config, seeded_layers
from test_loss_fusion import _megatron_loss, one_rank_groups  # noqa: F401

interpreted = pytest.mark.usefixtures("triton_interpreter")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The kernels on CPU tensors through Triton's interpreter, and compiled on a GPU.  A CUDA
    test runs with the CPU backend off: ``one_rank_groups`` (or an earlier CPU test in this
    process) turns it on, and its ``torch.cuda.current_device`` -> cpu redirect would send
    Inductor's and Triton's device queries to the CPU."""
    from megatron_coe import cpu

    if request.param == "cpu":
        request.getfixturevalue("triton_interpreter")
        yield request.param
        return
    was_active = cpu.is_active()
    cpu.disable()
    try:
        yield request.param
    finally:
        if was_active:
            cpu.enable("cpu")


@pytest.mark.parametrize("vocab", [50, 5000], ids=["one-block", "two-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_loss_equals_megatrons_cross_entropy(dtype, vocab, device, one_rank_groups):
    from megatron_coe.model.loss import fused_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(5, 3, vocab) * 4).to(device, dtype)
    target = torch.randint(0, vocab, (5, 3))
    target[0, 0], target[4, 2] = -1, vocab  # outside the vocabulary: predicted logit counts as 0
    target = target.to(device)
    g = torch.rand(5, 3, device=device)
    losses, grads = {}, {}
    for name, fn in (("triton", lambda x, t: fused_cross_entropy(x, t, "triton")),
                     ("compile", fused_cross_entropy), ("megatron", _megatron_loss)):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        (loss * g).sum().backward()
        losses[name], grads[name] = loss.float(), x.grad
    assert losses["triton"].shape == target.shape and grads["triton"].dtype == dtype
    for other in ("compile", "megatron"):
        assert torch.allclose(losses["triton"], losses[other], rtol=1e-5, atol=1e-5), other
    # one rounding to the dtype, as the compiled kernel's; Megatron's stays fp32 until cast
    assert torch.allclose(grads["triton"].float(), grads["compile"].float(),
                          rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)
    assert torch.allclose(grads["triton"].float(), grads["megatron"].to(dtype).float(),
                          rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("kernels", ["triton", "compile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gradient_written_over_the_logits_is_the_same(dtype, kernels, layout, device,
                                                          one_rank_groups):
    """overwrite_logits (the model's loss) gives the bits of the gradient written into a new
    tensor, in the logits' own memory where their rows are contiguous (no [tokens, V] tensor
    is added at the step's peak), and refuses a second backward, whose logits are gone, and
    any other saved use of the logits after it."""
    from megatron_coe.model.loss import fused_cross_entropy

    torch.manual_seed(0)
    base = (torch.randn(5, 3, 5000) * 4).to(device, dtype)
    target = torch.randint(0, 5000, (5, 3) if layout == "rows" else (3, 5)).to(device)
    target[0, 0] = -1  # outside the vocabulary
    g = torch.rand(target.shape, device=device)
    grads, where = [], {}
    for overwrite in (False, True):
        x = base.clone().requires_grad_()
        logits = x * 1.0  # made by the graph, as the output layer's are
        if layout == "transposed":
            logits = logits.transpose(0, 1)
        logits.register_hook(lambda grad, o=overwrite: where.update({o: grad.data_ptr()}))
        ptr = logits.data_ptr()
        (fused_cross_entropy(logits, target, kernels, overwrite_logits=overwrite) * g).sum(
        ).backward()
        grads.append(x.grad)
        if not overwrite:
            assert where[overwrite] != ptr
        elif layout == "rows":
            assert where[overwrite] == ptr
    assert torch.equal(grads[0], grads[1])
    logits = base.clone().requires_grad_() * 1.0
    loss = fused_cross_entropy(logits, target if layout == "rows" else target.T, kernels,
                               overwrite_logits=True).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice: its first wrote the gradient "
                                           "over the logits"):
        loss.backward()
    # another saved use of the logits, whose backward runs after the loss's: refused by
    # autograd's version check, not computed from the gradient
    logits = base.clone().requires_grad_() * 1.0
    other = (logits * logits).float().sum()
    loss = fused_cross_entropy(logits, target if layout == "rows" else target.T, kernels,
                               overwrite_logits=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (other + loss).backward()


@pytest.mark.parametrize("weighted", [True, False], ids=["routed", "shared"])
@pytest.mark.parametrize("rows,width", [(37, 24), (5, 704), (3, 1408)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_swiglu_equals_megatrons_fused_swiglu(rows, width, dtype, tol, weighted, device):
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, weighted_bias_swiglu_impl

    from megatron_coe.model.triton_swiglu import swiglu, weighted_swiglu

    torch.manual_seed(0)
    z = torch.randn(rows, 2 * width).to(device, dtype)
    p = torch.rand(rows, device=device)
    g = torch.randn(rows, width).to(device, dtype)
    if weighted:
        fns = (weighted_swiglu, lambda z, p: weighted_bias_swiglu_impl(z, None, p.unsqueeze(-1)))
    else:
        fns = (lambda z, p: swiglu(z), lambda z, p: bias_swiglu_impl(z, None))
    results = []
    for fn in fns:
        z_, p_ = z.clone().requires_grad_(), p.clone().requires_grad_(weighted)
        y = fn(z_, p_)
        y.backward(g)
        results.append((y, z_.grad, *([p_.grad.reshape(-1)] if weighted else [])))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= tol * scale


@pytest.mark.parametrize("tokens,k,shape", [(37, 3, (5,)), (9, 8, (1500,)), (6, 1, (2, 3)),
                                            (300, 4, (64,)), (0, 2, (5,))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gather_sum_is_the_ordered_fp32_sum(tokens, k, shape, dtype, device):
    """Each token's k rows summed in fp32 in their order and rounded once: bit for bit, also
    for bf16 (rounded as torch rounds), across column blocks (1500) and token blocks (300 x
    64), with one row per token, rows of more than one dim and no tokens; inf and NaN carried
    into their token's sum; within one rounding of torch's gather and sum."""
    from megatron_coe.model.permutation import sum_by_token
    from megatron_coe.model.triton_gather_sum import gather_sum

    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(tokens * k, *shape, generator=g) * 100).to(dtype)
    if tokens:
        rows[0].view(-1)[0], rows[1].view(-1)[0] = float("inf"), float("-inf")
        rows[2].view(-1)[-1] = float("nan")
    order = torch.randperm(tokens * k, generator=g)
    width = math.prod(shape)
    got = gather_sum(rows.to(device), order.to(device), k).cpu()
    assert got.shape == (tokens, *shape) and got.dtype == dtype
    terms = rows.float()[order].view(tokens, k, width)
    expected = torch.zeros(tokens, terms.shape[-1])
    for j in range(k):
        expected = expected + terms[:, j]
    torch.testing.assert_close(got.view(tokens, width), expected.to(dtype), rtol=0, atol=0,
                               equal_nan=True)
    # torch may add the k terms in another order: both fp32 sums are within (k - 1) eps of
    # the sum of magnitudes, then each is rounded once to the dtype
    torch_sum = sum_by_token(rows, order, k).view(tokens, width).float()
    bound = (torch.finfo(dtype).eps * torch_sum.abs()
             + 2 * k * torch.finfo(torch.float32).eps * terms.abs().sum(1))
    finite = torch_sum.isfinite()
    assert torch.equal(got.view(tokens, width).float().isnan(), torch_sum.isnan())
    assert ((got.view(tokens, width).float() - torch_sum).abs()[finite] <= bound[finite]).all()


def _config(kernels, recompute="none"):
    return layer_config(recompute=recompute,
                        model={"swiglu_fusion": True, "fused_kernels": kernels})


@interpreted
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_coe_layer_with_the_triton_kernels_equals_the_compiled_one(dtype, tol):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from coe_layer import saved_activation_bytes

    from megatron_coe.model import triton_gather_sum, triton_router, triton_swiglu

    from megatron_coe.model.shared_expert import SharedExpert

    compiled, triton = seeded_layers(_config("compile"), _config("triton"), dtype=dtype)
    assert triton.experts.fused_kernels == "triton" and triton.token_dispatcher.triton_sums
    assert isinstance(triton.shared_experts, SharedExpert) and triton.shared_experts.triton_swiglu
    assert triton.triton_routing and not compiled.triton_routing
    assert type(compiled.shared_experts) is not SharedExpert
    assert not compiled.token_dispatcher.triton_sums
    x = torch.randn(40, 2, 32, dtype=dtype)
    calls, sums, routings = [], [], []
    apply, gather_sum = triton_swiglu.SwiGLU.apply, triton_gather_sum.gather_sum
    route = triton_router.TopkSoftmax.apply
    triton_swiglu.SwiGLU.apply = lambda *a: calls.append(1) or apply(*a)
    triton_gather_sum.gather_sum = lambda *a: sums.append(1) or gather_sum(*a)
    triton_router.TopkSoftmax.apply = lambda *a: routings.append(1) or route(*a)
    try:
        got = fwd_bwd(triton, x)
    finally:
        triton_swiglu.SwiGLU.apply, triton_gather_sum.gather_sum = apply, gather_sum
        triton_router.TopkSoftmax.apply = route
    assert len(calls) == 4  # routed and shared experts, in each CoE iteration
    # the unpermutation's forward and the permutation's backward, and the gradients of the
    # iteration input's three uses (_Fan), each iteration
    assert len(sums) == 6
    assert len(routings) == 2  # the routers' softmax and top-k, in each CoE iteration
    for a, b in zip(got, fwd_bwd(compiled, x)):
        assert a.dtype == b.dtype
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale) <= tol
    # the same tensors kept for backward but the routers': per call Megatron keeps two fp32
    # softmax outputs [T, N] (routing, aux loss) and the int64 top-k [T, k]; the kernel keeps
    # one softmax and the bool routing map
    T, N, k, C = 80, 7, 2, 2
    kept, kept_compiled = saved_activation_bytes(triton, x), saved_activation_bytes(compiled, x)
    assert kept_compiled["kept"] - kept["kept"] == C * (T * N * 4 + T * k * 8 - T * N)


@interpreted
def test_moe_act_on_the_triton_swiglu_gives_the_same_bits():
    kept, recomputed = seeded_layers(_config("triton"), _config("triton", "moe_act"))
    assert recomputed.experts.recompute_activation
    x = torch.randn(40, 2, 32)
    for a, b in zip(fwd_bwd(recomputed, x), fwd_bwd(kept, x)):
        assert torch.equal(a, b)


def test_fused_kernels_auto_is_triton_on_cuda_and_triton_needs_a_gpu(monkeypatch):
    from megatron_coe import config as cfg
    from megatron_coe.checkpoint import model_definition
    from megatron_coe.config import load_config

    pytest.importorskip("triton")
    for device, kernels, fused_loss in (("cuda", "triton", True), ("cpu", "compile", False)):
        config = load_config(None, [f"device={device}"])
        assert config.model.fused_kernels == "auto" and config.model.loss_fusion is None
        assert (cfg.fused_kernels(config), cfg.loss_fusion(config)) == (kernels, fused_loss)
    # auto keeps Megatron's loss where the fused one cannot run or compile is asked for, and
    # takes triton for the SwiGLU alone then
    for override, kernels in (("parallel.tensor=2", "triton"),
                              ("model.fused_kernels=compile", "compile"),
                              ("model.transformer_overrides={cross_entropy_loss_fusion: true}",
                               "triton")):
        config = load_config(None, ["device=cuda", override])
        assert (cfg.fused_kernels(config), cfg.loss_fusion(config)) == (kernels, False)
    off = load_config(None, ["device=cuda", "model.swiglu_fusion=false",
                             "model.loss_fusion=false"])
    assert cfg.fused_kernels(off) == "compile"  # nothing for Triton to replace
    monkeypatch.setattr(cfg.importlib.util, "find_spec", lambda name: None)
    config = load_config(None, ["device=cuda"])
    assert (cfg.fused_kernels(config), cfg.loss_fusion(config)) == ("compile", False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="model.fused_kernels='fast' is not valid; use one of "
                                         "auto, compile, triton"):
        load_config(None, ["model.fused_kernels=fast"])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="model.fused_kernels=triton runs Triton kernels on a "
                                         "GPU; device=cpu: use model.fused_kernels=compile"):
        load_config(None, ["device=cpu", "model.fused_kernels=triton"])
    with pytest.raises(ValueError, match="both are off: turn one on or drop "
                                         "model.fused_kernels"):
        load_config(None, ["device=cuda", "model.fused_kernels=triton",
                           "model.swiglu_fusion=false", "model.loss_fusion=false"])
    cuda = load_config(None, ["device=cuda", "model.fused_kernels=triton"])
    # a kernel choice, not the model: checkpoints load either way
    assert model_definition(cuda) == model_definition(load_config(None, ["device=cuda"]))


def test_auto_keeps_the_triton_kernels_only_where_they_ran(monkeypatch):
    """model.fused_kernels=auto on CUDA tries the kernels once per process and falls back to
    compile, with Megatron's loss unless the fused one was asked for, where they failed."""
    from megatron_coe.config import load_config
    from megatron_coe.model import build

    pytest.importorskip("triton")
    cuda = load_config(None, ["device=cuda"])
    shapes = []
    monkeypatch.setattr(build, "triton_kernels_error", lambda *shape: shapes.append(shape))
    assert build.resolve_fused_kernels(cuda) == (
        "triton", True, "auto: device=cuda and the Triton kernels run here")
    # tried in the run's dtype and at its vocabulary, expert widths and routing (the kernels'
    # blocks); a dense model's router kernel at top-2 of 4 experts
    assert shapes == [(torch.float32, cuda.model.vocab_size, cuda.model.ffn_hidden_size, 4, 2)]
    moe = load_config(Path(__file__).resolve().parents[2] / "configs/paper/moe-8of64.yaml", [])
    build.resolve_fused_kernels(moe)
    assert shapes[-1] == (torch.bfloat16, 32768, 704, 63, 8)  # the routed experts' SwiGLU width
    monkeypatch.setattr(build, "triton_kernels_error", lambda *shape: "CompilationError: no ptxas")
    assert build.resolve_fused_kernels(cuda) == (
        "compile", False, "auto: the Triton kernels failed on this GPU (CompilationError: no "
        "ptxas); compile")
    asked = load_config(None, ["device=cuda", "model.loss_fusion=true"])
    assert build.resolve_fused_kernels(asked)[:2] == ("compile", True)
    named = load_config(None, ["device=cuda", "model.fused_kernels=triton"])
    assert build.resolve_fused_kernels(named) == ("triton", True, "model.fused_kernels=triton")
    assert build.resolve_fused_kernels(load_config(None, ["device=cpu"])) == (
        "compile", False, "auto: compile on CPU")


def test_auto_runs_the_kernels_every_rank_can_run(monkeypatch, capsys):
    """One collective, whatever this rank's probe found: Triton where every rank ran it, else
    compile and Megatron's loss on all of them (a rank that failed alone must not hang or
    diverge from the others)."""
    from megatron_coe.config import load_config
    from megatron_coe.model import build

    pytest.importorskip("triton")
    cuda = load_config(None, ["device=cuda", "model.swiglu_fusion=true"])  # no SwiGLU probe
    asked = []

    def others_failed(config, ok):
        asked.append(ok)
        return False

    monkeypatch.setattr(build, "_on_every_rank", others_failed)
    for here, why in ((None, "auto: the Triton kernels failed on another rank; compile"),
                      ("CompilationError: x", "auto: the Triton kernels failed on this GPU")):
        asked.clear()
        monkeypatch.setattr(build, "triton_kernels_error", lambda *shape: here)
        resolved = build.resolved_kernels(cuda, announce=True)
        assert (resolved.model.fused_kernels, resolved.model.loss_fusion) == ("compile", False)
        assert asked == [here is None]
        assert why in capsys.readouterr().out
    monkeypatch.setattr(build, "_on_every_rank", lambda config, ok: ok)
    monkeypatch.setattr(build, "triton_kernels_error", lambda *shape: None)
    resolved = build.resolved_kernels(cuda)
    assert (resolved.model.fused_kernels, resolved.model.loss_fusion) == ("triton", True)


_COMPILE = r'''
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from megatron_coe.model import triton_cross_entropy as ce, triton_sum_into as si, triton_swiglu as sw
from megatron_coe.model import triton_gather_sum as gs, triton_router as rt
from megatron_coe.model import triton_row_index as ri

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
out = {}

def build(name, fn, signature, constexprs, warps, unaligned=()):
    # integers specialised as Triton's launcher does for multiples of 16 (the paper configs'),
    # but those in `unaligned`
    attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(signature)
             if signature[k] != "constexpr" and k not in unaligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = kernel.asm["ptx"]
    with open(os.path.join(sys.argv[1], name + ".ptx"), "w") as f:
        f.write(ptx)
    log = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                         capture_output=True, text=True, check=True).stderr
    out[name] = {"spills": sorted(set(re.findall(r"(\d+) bytes spill", log))),
                 "vector_loads": len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v[248]", ptx))}

block, warps = ce._block(32768)
build("ce_forward", ce.coe_cross_entropy_forward,
      {"logits_ptr": "*bf16", "target_ptr": "*i64", "loss_ptr": "*fp32", "lse_ptr": "*fp32",
       "V": "i32", "row_stride": "i32", "BLOCK": "constexpr"}, {"BLOCK": block}, warps)
build("ce_backward", ce.coe_cross_entropy_backward,
      {"logits_ptr": "*bf16", "target_ptr": "*i64", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
       "out_ptr": "*bf16", "V": "i32", "row_stride": "i32", "BLOCK": "constexpr"},
      {"BLOCK": block}, warps)
block_r, block_f, warps = sw._blocks(704)
for p in (True, False):
    blocks = {"HAS_P": p, "BLOCK_R": block_r, "BLOCK_F": block_f}
    build(f"swiglu_forward_p{int(p)}", sw.coe_swiglu_forward,
          {"z_ptr": "*bf16", "p_ptr": "*fp32", "out_ptr": "*bf16", "R": "i32", "F": "i32",
           "HAS_P": "constexpr", "BLOCK_R": "constexpr", "BLOCK_F": "constexpr"}, blocks, warps)
    build(f"swiglu_backward_p{int(p)}", sw.coe_swiglu_backward,
          {"z_ptr": "*bf16", "p_ptr": "*fp32", "g_ptr": "*bf16", "dz_ptr": "*bf16",
           "dp_ptr": "*fp32", "R": "i32", "F": "i32", "HAS_P": "constexpr",
           "WANT_DP": "constexpr", "BLOCK_R": "constexpr", "BLOCK_F": "constexpr"},
          {**blocks, "WANT_DP": p}, warps)
for acc in (True, False):
    build(f"sum_into_acc{int(acc)}", si.coe_sum_into,
          {"dest_ptr": "*fp32", "a_ptr": "*bf16", "b_ptr": "*bf16", "n": "i64",
           "BF16": "constexpr", "ACCUMULATE": "constexpr", "BLOCK": "constexpr"},
          {"BF16": True, "ACCUMULATE": acc, "BLOCK": si.BLOCK}, 8)
block_t, block_h = gs._blocks(1024)
# CoE-2(4/64)'s permutation backward, MoE(8/64)'s unpermutation with the reference residual's
# two addends, and four gradients summed in order (the sum of one row, no gather)
for name, k, gather, addends in (("gather_sum_k4", 4, True, 0), ("gather_sum_k8_add2", 8, True, 2),
                                 ("sum_in_order_4", 1, False, 3)):
    build(name, gs.coe_gather_sum,
          {"rows_ptr": "*bf16", "order_ptr": "*i64", "add1_ptr": "*bf16", "add2_ptr": "*bf16",
           "add3_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32", "H": "i32", "K": "constexpr",
           "GATHER": "constexpr", "ADDENDS": "constexpr", "BF16": "constexpr",
           "BLOCK_T": "constexpr", "BLOCK_H": "constexpr"},
          {"K": k, "GATHER": gather, "ADDENDS": addends, "BF16": True, "BLOCK_T": block_t,
           "BLOCK_H": block_h}, gs.WARPS)
block_t, block_n = rt._blocks(63)
for k in (4, 8):
    build(f"router_k{k}", rt.coe_topk_softmax,
          {"logits_ptr": "*fp32", "probs_ptr": "*fp32", "map_ptr": "*u8", "scores_ptr": "*fp32",
           "counts_ptr": "*i32", "T": "i32", "N": "i32", "K": "constexpr",
           "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"},
          {"K": k, "BLOCK_T": block_t, "BLOCK_N": block_n}, rt.WARPS, unaligned={"N"})
    build(f"row_index_k{k}", ri.coe_row_index,
          {"map_ptr": "*u8", "first_ptr": "*i64", "index_ptr": "*i64", "experts_ptr": "*i64",
           "order_ptr": "*i64", "T": "i32", "N": "i32", "K": "constexpr",
           "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"},
          {"K": k, "BLOCK_T": block_t, "BLOCK_N": block_n}, rt.WARPS, unaligned={"N"})
build("router_backward", rt.coe_topk_softmax_backward,
      {"dprobs_ptr": "*fp32", "dscores_ptr": "*fp32", "scores_ptr": "*fp32", "map_ptr": "*u8",
       "out_ptr": "*fp32", "T": "i32", "N": "i32", "HAS_DPROBS": "constexpr",
       "HAS_DSCORES": "constexpr", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"},
      {"HAS_DPROBS": True, "HAS_DSCORES": True, "BLOCK_T": block_t, "BLOCK_N": block_n},
      rt.WARPS, unaligned={"N"})
print(json.dumps(out))
'''


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """What the interpreter does not check: Triton compiles each kernel for an H100 (sm_90, at
    the paper configs' sizes and the launch's block choices), ptxas keeps every value in
    registers, and the loads of bf16 rows are vectorised (the routers' rows of 63 logits are
    not 16-byte aligned).  Offline: no GPU needed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[2],
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kernels = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(kernels) == 16
    for name, k in kernels.items():
        assert k["spills"] in ([], ["0"]), (name, k)
        assert k["vector_loads"] > 0 or name.startswith(("router", "row_index")), (name, k)
