"""The language-model loss as two fused kernels (``model.loss_fusion``).

For logits z (one row of V vocabulary scores per token) and target t, the token's loss is

    loss = logsumexp(z) - z_t = log sum_v exp(z_v - m) + m - z_t,     m = max_v z_v

and its gradient, for the loss's incoming gradient g,

    dloss/dz_v = g * (softmax(z)_v - [v == t]),    softmax(z)_v = exp(z_v - logsumexp(z)).

Megatron's vocabulary-parallel cross entropy computes this in steps that each write a full
[tokens, V] fp32 tensor (the logits cast to fp32, z - m, exp, the softmax kept for backward, the
gradient, its cast back): at the paper's 16,384 tokens x 32,768 vocabulary that is 2 GiB per
step, about ten times over.  Here the forward is one reduction that reads the logits once (in
their own dtype, math in fp32) and keeps only logsumexp(z) per token; the backward recomputes
the softmax from the logits and writes the gradient once, in the logits' dtype.  ``model.fused_kernels`` says how the two kernels are
made: ``compile`` (the default) ``torch.compile``s the torch functions below (Triton on CUDA,
generated); ``triton`` runs the hand-written Triton kernels of triton_cross_entropy.py (CUDA).
Either equals Megatron's within fp32 rounding (the sums are taken in another order).

The model's loss (``CoEGPTModel``) writes the gradient over the logits (``overwrite_logits``),
which nothing reads after the loss.  A training step's peak memory falls at the end of the
forward's graph, with every layer's activations still kept: written into a new tensor, the
loss's backward held two [tokens, V] tensors there; written over the logits it holds one, and
the peak moves to the output layer's backward, which adds the hidden states' and the weight's
gradients to that one: (T V - T H - V H) values less, 0.9 GiB at the paper's 16,384 tokens x
32,768 vocabulary x hidden 1024 in bf16.  Its backward runs once; a second (``retain_graph``) is
refused, since the logits are gone.

Only for an unsplit vocabulary (tensor parallel size 1); Megatron's own runs otherwise.  A target
outside [0, V) picks m (no gradient through it), as Megatron's masking gives with one partition.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from torch.autograd.function import once_differentiable


def _token_loss(logits: torch.Tensor, target: torch.Tensor):
    z = logits.float()
    inside = (target >= 0) & (target < z.shape[-1])
    picked = torch.gather(z, -1, torch.where(inside, target, 0).unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(z, dim=-1)
    return lse - torch.where(inside, picked, z.amax(dim=-1)), lse


def _logits_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                 grad: torch.Tensor) -> torch.Tensor:
    z = logits.float()
    softmax = torch.exp(z - lse.unsqueeze(-1))
    vocab = torch.arange(z.shape[-1], device=z.device)
    hit = (vocab == target.unsqueeze(-1)).to(z.dtype)
    return ((softmax - hit) * grad.unsqueeze(-1)).to(logits.dtype)


def _logits_grad_in_place(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    # compiled, one kernel that reads each logit and writes its gradient in its place
    return logits.copy_(_logits_grad(logits, target, lse, grad))


_compiled: dict[str, object] = {}


def _kernel(name: str, impl: str):
    """``loss``, ``grad`` or ``grad_in_place``, made as ``impl`` says."""
    if impl == "triton":
        from functools import partial

        from megatron_coe.model import triton_cross_entropy

        return {"loss": triton_cross_entropy.token_loss,
                "grad": triton_cross_entropy.logits_grad,
                "grad_in_place": partial(triton_cross_entropy.logits_grad, in_place=True)}[name]
    if name not in _compiled:
        # torch.compile's default: specialised to the first shape, then one dynamic kernel
        _compiled[name] = torch.compile({"loss": _token_loss, "grad": _logits_grad,
                                         "grad_in_place": _logits_grad_in_place}[name])
    return _compiled[name]


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, impl, overwrite_logits):
        loss, lse = _kernel("loss", impl)(logits, target)
        ctx.save_for_backward(logits, target, lse)
        ctx.impl, ctx.overwrite_logits, ctx.spent = impl, overwrite_logits, False
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.overwrite_logits:
            if ctx.spent:
                raise RuntimeError("the fused loss's backward ran twice: its first wrote the "
                                   "gradient over the logits (overwrite_logits), so a second "
                                   "has nothing to read; backward without retain_graph")
            ctx.spent = True
        logits, target, lse = ctx.saved_tensors
        kernel = _kernel("grad_in_place" if ctx.overwrite_logits else "grad", ctx.impl)
        dlogits = kernel(logits, target, lse, grad.contiguous())
        if ctx.overwrite_logits:  # a write autograd did not see (the Triton kernel's): any
            # other saved use of the logits fails its version check instead of reading these
            torch.autograd.graph.increment_version(logits)
        # detached: whoever keeps the gradient does not keep the forward graph with it
        return dlogits.detach(), None, None, None


def fused_cross_entropy(logits: torch.Tensor, target: torch.Tensor, impl: str = "compile",
                        overwrite_logits: bool = False) -> torch.Tensor:
    """Per-token loss (fp32, target's shape) of ``logits`` [..., V] (any float dtype) against
    ``target`` [...]; the gradient comes back in the logits' dtype.  ``impl``: model.fused_kernels.
    ``overwrite_logits``: the backward writes the gradient over ``logits`` (which must not be
    read after it) instead of into a new tensor."""
    return _FusedCrossEntropy.apply(logits, target, impl, overwrite_logits)


class CoEGPTModel(GPTModel):
    """Megatron's GPTModel whose language-model loss is :func:`fused_cross_entropy` when
    ``loss_fusion`` is set (tensor parallel size 1), made as ``fused_kernels`` says; otherwise
    Megatron's own."""

    def __init__(self, *args, loss_fusion: bool = False, fused_kernels: str = "compile",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fusion = loss_fusion
        self.fused_kernels = fused_kernels

    def compute_language_model_loss(self, labels: torch.Tensor,
                                    logits: torch.Tensor) -> torch.Tensor:
        if not self.loss_fusion:
            return super().compute_language_model_loss(labels, logits)
        # logits [s, b, V], labels [b, s] -> loss [b, s], as Megatron's
        # the output layer's logits: read by nothing after the loss, so their memory takes the
        # gradient
        return fused_cross_entropy(logits, labels.transpose(0, 1).contiguous(),
                                   self.fused_kernels, overwrite_logits=True).transpose(
            0, 1).contiguous()
