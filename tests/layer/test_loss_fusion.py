"""model.loss_fusion: the language-model loss as two compiled kernels (on CPU inductor's C++
kernels) equals Megatron's vocabulary-parallel cross entropy, loss and logits gradient, within
float rounding, for fp32 and bf16 logits and for targets outside the vocabulary; the gradient
comes back in the logits' dtype; a model built with it gives Megatron's loss and gradients, the
logits' gradient written over them,
with either model.fused_kernels (triton on CPU through Triton's interpreter); auto (the
default) turns it on with the Triton kernels on CUDA only, and an explicit true is refused where
it cannot run."""

import pytest
import torch


def _megatron_loss(logits, target):
    from megatron.core import parallel_state, tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy(
        logits, target, tp_group=parallel_state.get_tensor_model_parallel_group())


@pytest.fixture(scope="module")
def one_rank_groups():
    from megatron_coe import parallel
    from megatron_coe.config import load_config

    from layer_harness import layer_config  # noqa: F401  (conftest's path)

    parallel.initialize(load_config(None, ["device=cpu"]))
    yield


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_fused_loss_equals_megatrons_cross_entropy(dtype, tol, one_rank_groups):
    from megatron_coe.model.loss import fused_cross_entropy

    torch.manual_seed(0)
    logits = (torch.randn(7, 3, 50) * 4).to(dtype)
    target = torch.randint(0, 50, (7, 3))
    target[0, 0], target[5, 2] = -1, 50  # outside the vocabulary: predicted logit counts as 0
    g = torch.rand(7, 3)
    grads, losses = [], []
    for fn in (fused_cross_entropy, _megatron_loss):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        (loss * g).sum().backward()
        losses.append(loss)
        grads.append(x.grad)
    assert losses[0].dtype == torch.float32 and losses[0].shape == target.shape
    assert grads[0].dtype == dtype
    assert torch.allclose(losses[0], losses[1].float(), rtol=tol, atol=tol)
    # Megatron's gradient is fp32 until its caller casts; ours is rounded once to the dtype
    assert torch.allclose(grads[0].float(), grads[1].to(dtype).float(),
                          rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


def _model_loss_and_grads(loss_fusion, kernels="compile"):
    from megatron_coe.config import load_config
    from megatron_coe.model import build_model

    config = load_config(None, ["device=cpu", "precision=fp32", "model.num_layers=1",
                                f"model.loss_fusion={str(loss_fusion).lower()}",
                                f"model.fused_kernels={kernels}"])
    torch.manual_seed(0)
    model = build_model(config)
    assert model.loss_fusion is loss_fusion
    memory = {}

    def watch(module, args, output):  # where the logits are, and where their gradient comes
        logits = output[0]
        memory["logits"] = logits.data_ptr()
        logits.register_hook(lambda grad: memory.update(grad=grad.data_ptr()))

    model.output_layer.register_forward_hook(watch)
    tokens = torch.randint(0, config.model.vocab_size, (2, config.model.seq_length + 1))
    position_ids = torch.arange(config.model.seq_length).expand(2, -1)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
    loss.mean().backward()
    if loss_fusion:  # the logits' gradient written over them (no second [tokens, V] tensor)
        assert memory["grad"] == memory["logits"]
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kernels", ["compile", "triton"])
def test_a_model_with_the_fused_loss_gives_megatrons_loss_and_gradients(kernels, request,
                                                                        one_rank_groups):
    if kernels == "triton":  # model.fused_kernels=triton on CPU: through Triton's interpreter
        request.getfixturevalue("triton_interpreter")
    fused, fused_grads = _model_loss_and_grads(True, kernels)
    plain, plain_grads = _model_loss_and_grads(False)
    assert fused.shape == plain.shape
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys() and fused_grads
    for name in plain_grads:
        assert torch.allclose(fused_grads[name], plain_grads[name], rtol=1e-4, atol=1e-7), name


def test_loss_fusion_is_auto_and_refused_where_it_cannot_run():
    """Auto (null) resolves with model.fused_kernels (test_triton_kernels.py): on with the
    Triton kernels on CUDA, off on CPU; an explicit true is refused where it cannot run."""
    from megatron_coe.checkpoint import model_definition
    from megatron_coe.config import load_config, loss_fusion

    assert load_config(None, ["device=cuda"]).model.loss_fusion is None
    assert loss_fusion(load_config(None, ["device=cpu"])) is False
    with pytest.raises(ValueError, match="model.loss_fusion=true needs the whole vocabulary on "
                                         "each rank; parallel.tensor=2 splits it"):
        load_config(None, ["parallel.tensor=2", "model.loss_fusion=true"])
    with pytest.raises(ValueError, match="two fused losses: keep one"):
        load_config(None, ["model.loss_fusion=true",
                           "model.transformer_overrides={cross_entropy_loss_fusion: true}"])
    # a kernel choice, not the model: checkpoints load either way
    assert model_definition(load_config(None, ["model.loss_fusion=true"])) == model_definition(
        load_config(None, ["model.loss_fusion=false"]))
