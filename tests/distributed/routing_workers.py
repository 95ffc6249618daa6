"""Long-lived rank processes for routing experiments: one EP = 1 world (1 process) and one
EP = 2 world (2 processes), each holding the same CoE layer weights.  The test sends a routing
case; the EP = 1 worker computes the reference output and gradients, the EP = 2 ranks compute
theirs and compare.  Cases force the routing map of every iteration (the probabilities stay the
router's softmax, so router gradients still flow); capacity dropping, when asked, is Megatron's
own rule applied to each rank's tokens, as its router does.

A case: dict(topk, capacity, tokens (per rank, T), plans: [C lists of [2T lists of experts]]).
"""

from __future__ import annotations

import os
import queue
import traceback

import torch
import torch.multiprocessing as mp

N, H, C = 8, 16, 2


def _config(ep, topk, capacity, device):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "device": device,
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": N, "topk": topk, "expert_hidden_size": 12,
                          "shared_expert_hidden_size": 8, "aux_loss": "none",
                          "capacity_factor": capacity},
                  "coe": {"iterations": C}},
        "parallel": {"expert": ep, "timeout_minutes": 1.0},
    })


def _force(layer, case, offset_ref):
    """Make iteration t's router pick case['plans'][t][global token id]."""
    import torch.nn.functional as F
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    for t, router in enumerate(layer.routers):
        def routing(logits, padding_mask=None, t=t):
            logits = logits.view(-1, N)
            n = logits.shape[0]
            rows = case["plans"][t][offset_ref[0]: offset_ref[0] + n]
            mask = torch.zeros(n, N, dtype=torch.bool, device=logits.device)
            for i, experts in enumerate(rows):
                mask[i, experts] = True
            probs = F.softmax(logits.float(), dim=-1) * mask
            if case["capacity"] is not None:
                probs, mask = apply_router_token_dropping(probs, mask, case["topk"],
                                                          case["capacity"])
            return probs, mask
        router.routing = routing


def _layers(ep, rank, device):
    """One layer per (topk, capacity); same weights everywhere (EP = 1 weights, sliced)."""
    from megatron_coe.model import build_moe_layer

    layers = {}
    for topk in (1, 2):
        for capacity in (None, 0.5, 1.0):
            torch.manual_seed(1)
            ref = build_moe_layer(_config(1, topk, capacity, device)) if ep == 1 else None
            layer = ref if ep == 1 else build_moe_layer(_config(ep, topk, capacity, device))
            layers[(topk, capacity)] = layer
    return layers


def _run(layer, case, x, gy, offset):
    offset_ref = [offset]
    _force(layer, case, offset_ref)
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * gy).sum().backward()
    from ranks import named_grads

    return y.detach(), x.grad, {n: g.clone() for n, g in named_grads(layer).items()
                                if g is not None}


def ep1_worker(inbox, outbox, port, device):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    layers = _layers(1, 0, device)
    weights = {k: {n: v.clone() for n, v in layer.state_dict().items() if torch.is_tensor(v)}
               for k, layer in layers.items()}
    outbox.put(("weights", _cpu(weights)))
    while True:
        case = inbox.get()
        if case is None:
            return
        try:
            layer = layers[(case["topk"], case["capacity"])]
            T = case["tokens"]
            g = torch.Generator().manual_seed(case["seed"])
            x = torch.randn(2 * T, 1, H, generator=g).to(device)
            gy = torch.randn(2 * T, 1, H, generator=g).to(device)
            parts = [_run(layer, case, x[r * T:(r + 1) * T].contiguous(),
                          gy[r * T:(r + 1) * T], r * T) for r in range(2)]
            # per-rank token batches: the same capacity rule as EP = 2 (dropless: no change)
            y = torch.cat([p[0] for p in parts])
            gx = torch.cat([p[1] for p in parts])
            grads = {n: parts[0][2].get(n, 0) + parts[1][2].get(n, 0)
                     for n in set(parts[0][2]) | set(parts[1][2])}
            # across processes on the CPU: a CUDA tensor would be shared by IPC handle
            ref = {"x": x, "gy": gy, "y": y, "gx": gx, "grads": grads}
            outbox.put(("ok", {k: _cpu(v) for k, v in ref.items()}))
        except Exception:
            outbox.put(("error", traceback.format_exc()))


def ep2_worker(rank, inbox, outbox, port, weights, device):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ranks import global_expert_name
    from reference import max_rel_err

    layers = _layers(2, rank, device)
    local = N // 2

    def global_name(name):
        return global_expert_name(name, rank, local)

    for key, layer in layers.items():
        layer.load_state_dict({n: weights[key][global_name(n)].to(device) for n in layer.state_dict()
                               if global_name(n) in weights[key]}, strict=False)
    while True:
        item = inbox.get()
        if item is None:
            return
        case, ref = item
        ref = {k: _to(v, device) for k, v in ref.items()}
        try:
            layer = layers[(case["topk"], case["capacity"])]
            T = case["tokens"]
            sl = slice(rank * T, (rank + 1) * T)
            y, gx, grads = _run(layer, case, ref["x"][sl].contiguous(), ref["gy"][sl], rank * T)
            errors = [("output", max_rel_err(y, ref["y"][sl])),
                      ("input grad", max_rel_err(gx, ref["gx"][sl]))]
            for name, p in layer.state_dict().items():  # per-expert names, either experts
                if not torch.is_tensor(p):
                    continue
                g = grads.get(name, torch.zeros_like(p))
                if not name.startswith("experts."):
                    dist.all_reduce(g)
                r = ref["grads"].get(global_name(name))
                r = torch.zeros_like(g) if not torch.is_tensor(r) else r
                if r.abs().max() == 0 and g.abs().max() == 0:
                    continue
                errors.append((name, max_rel_err(g, r)))
            bad = [(n, e) for n, e in errors if not e <= 1e-5]
            outbox.put(("ok", bad))
        except Exception:
            outbox.put(("error", traceback.format_exc()))


def _cpu(value):
    """Tensors (also in a dict) moved to the CPU for the queue."""
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    return value.cpu() if torch.is_tensor(value) else value


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if torch.is_tensor(value) else value


class Workers:
    """Start the EP = 1 and EP = 2 worlds on ``device`` (gloo on CPU, NCCL on CUDA: one GPU per
    EP = 2 rank); ``compare(case)`` -> list of mismatches."""

    def __init__(self, device="cpu"):
        from megatron_coe.parallel import free_port as _free_port

        ctx = mp.get_context("spawn")
        self.q1_in, self.q1_out = ctx.Queue(), ctx.Queue()
        self.p1 = ctx.Process(target=ep1_worker, args=(self.q1_in, self.q1_out, _free_port(),
                                                       device),
                              daemon=True)
        self.p1.start()
        kind, weights = self.q1_out.get(timeout=180)
        port = _free_port()
        self.q2_in = [ctx.Queue(), ctx.Queue()]
        self.q2_out = [ctx.Queue(), ctx.Queue()]
        self.p2 = [ctx.Process(target=ep2_worker, args=(r, self.q2_in[r], self.q2_out[r], port,
                                                        weights, device), daemon=True)
                   for r in range(2)]
        for p in self.p2:
            p.start()

    def compare(self, case, timeout=120):
        self.q1_in.put(case)
        kind, ref = self.q1_out.get(timeout=timeout)
        if kind == "error":
            raise AssertionError("EP = 1 failed:\n" + ref)
        for q in self.q2_in:
            q.put((case, ref))
        mismatches = []
        for r, q in enumerate(self.q2_out):
            try:
                kind, result = q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"EP = 2 rank {r} did not answer") from None
            if kind == "error":
                raise AssertionError(f"EP = 2 rank {r} failed:\n{result}")
            mismatches += [(r, *m) for m in result]
        return mismatches

    def close(self):
        self.q1_in.put(None)
        for q in self.q2_in:
            q.put(None)
        for p in [self.p1, *self.p2]:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
