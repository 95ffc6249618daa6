"""What a run reports: FLOPs per token (CoE iterations counted), the fixed log line,
metrics.jsonl, TensorBoard scalars, memory and GPU telemetry.

Training FLOPs per token = 3 x forward (backward ~ 2 x forward), matmuls only:

    attention (per layer):  MHA 2*4*H^2  |  MLA 2*(H*q + H*(r_kv + d_rope) + r_kv*h*(d_nope + d_v)
                            + h*d_v*H)   + causal scores/values 2 * (S/2) * h * (d_qk + d_v)
    dense MLP (SwiGLU):     2*3*H*F
    CoE layer:              C * [ 2*H*N (router) + k * 2*3*H*F_e + 2*3*H*F_s ]
    output layer:           2*H*V

MFU = achieved FLOP/s per device / peak FLOP/s per device (``train.peak_tflops`` or the bf16
dense peak of a known GPU; none on CPU unless configured).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_coe.config import Config

# bf16 dense peak TFLOP/s per device, by substring of torch.cuda.get_device_name(); the longest
# matching key wins ("H100 PCIe" over "H100", "GB200" over "B200").
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H800": 989.4, "A100": 312.0, "B200": 2250.0, "GB200": 2500.0, "L40S": 362.1}


def active_expert_passes(config: Config) -> float:
    """Expert MLP passes per token per MoE layer: C * (k routed + shared width / expert width)."""
    moe = config.model.moe
    if moe is None:
        return 0.0
    c = config.model.coe.iterations if config.model.coe else 1
    shared = (moe.shared_expert_hidden_size or 0) / moe.expert_hidden_size
    return c * (moe.topk + shared)


def parameter_count(config: Config) -> int:
    """Total parameters of the model ``build_model`` makes (all ranks together)."""
    m = config.model
    h = m.hidden_size
    if m.attention == "mla":
        a, heads = m.mla, m.num_attention_heads
        d_qk = a.qk_head_dim + a.qk_pos_emb_head_dim
        # (no latent norms: Megatron adds them only with transformer_overrides.qk_layernorm)
        q = (h * a.q_lora_rank + a.q_lora_rank * heads * d_qk if a.q_lora_rank
             else h * heads * d_qk)
        attn = (q + h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)
                + a.kv_lora_rank * heads * (a.qk_head_dim + a.v_head_dim)
                + heads * a.v_head_dim * h)
    else:
        attn = 4 * h * h
    total = 2 * m.vocab_size * h + h  # embedding, output layer, final norm
    for layer in range(m.num_layers):
        total += attn + 2 * h  # + input and pre-MLP norms
        if m.moe is None or layer in m.dense_layers:
            total += 3 * h * m.ffn_hidden_size
        else:
            moe = m.moe
            routers = m.coe.iterations if m.coe and m.coe.router == "independent" else 1
            total += routers * moe.num_experts * h + moe.num_experts * 3 * h * moe.expert_hidden_size
            total += 3 * h * (moe.shared_expert_hidden_size or 0)
    return total


def forward_flops_per_token(config: Config, causal: bool = True) -> float:
    """Matmul FLOPs of one token's forward pass.  ``causal``: count half of the S x S
    attention products (what flash attention computes); False counts them all."""
    m = config.model
    h, s = m.hidden_size, m.seq_length
    span = s / 2 if causal else s
    if m.attention == "mla":
        a = m.mla
        heads, d_qk = m.num_attention_heads, a.qk_head_dim + a.qk_pos_emb_head_dim
        q = (h * a.q_lora_rank + a.q_lora_rank * heads * d_qk) if a.q_lora_rank else h * heads * d_qk
        proj = (q + h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)
                + a.kv_lora_rank * heads * (a.qk_head_dim + a.v_head_dim) + heads * a.v_head_dim * h)
        attn = 2 * proj + 2 * span * heads * (d_qk + a.v_head_dim)
    else:
        attn = 2 * 4 * h * h + 2 * span * 2 * h
    total = 0.0
    for layer in range(m.num_layers):
        total += attn
        if m.moe is None or layer in m.dense_layers:
            total += 2 * 3 * h * m.ffn_hidden_size
        else:
            moe = m.moe
            c = m.coe.iterations if m.coe else 1
            per_iter = 2 * h * moe.num_experts + moe.topk * 2 * 3 * h * moe.expert_hidden_size
            if moe.shared_expert_hidden_size:
                per_iter += 2 * 3 * h * moe.shared_expert_hidden_size
            total += c * per_iter
    return total + 2 * h * m.vocab_size


def train_flops_per_token(config: Config) -> float:
    return 3 * forward_flops_per_token(config)


def peak_tflops(config: Config) -> float | None:
    if config.train.peak_tflops is not None:
        return config.train.peak_tflops
    if config.device == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
            if key in name:
                return PEAK_TFLOPS[key]
    return None


def memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import psutil

    return {"mem_gib": psutil.Process().memory_info().rss / 2**30}


class GPUTelemetry:
    """Utilisation, memory and power of this rank's GPU via nvidia-ml-py; empty on CPU."""

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:  # no NVML (driver-less container, MIG without access, ...)
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
            power = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except Exception:
            return {}
        return {"gpu_util": float(util.gpu), "gpu_mem_gib": mem.used / 2**30, "gpu_power_w": power}


def format_line(r: dict, total_steps: int) -> str:
    """The fixed log line: same fields in the same order every interval."""
    parts = [f"step {r['step']:>{len(str(total_steps))}}/{total_steps}",
             f"loss {r['loss']:.4f}", f"lr {r['lr']:.3e}", f"gnorm {r['grad_norm']:.3f}",
             f"tok/s {r['tokens_per_s']:.0f}", f"TFLOP/s/dev {r['tflops_per_device']:.3f}",
             "MFU " + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"),
             f"mem {r['mem_gib']:.2f}GiB", f"skipped {r['skipped_steps']}",
             f"eta {_hms(r['eta_s'])}"]
    if "loss_scale" in r:  # fp16
        parts.insert(-1, f"loss scale {r['loss_scale']:g} (overflows {r['overflow_steps']})")
    iters = sorted({k.split("/")[1] for k in r if k.startswith("coe/iter")})
    for it in iters:
        parts.append(f"{it}: aux {r.get(f'coe/{it}/aux_loss', float('nan')):.3f} "
                     f"load {r[f'coe/{it}/load_min']:.2f}-{r[f'coe/{it}/load_max']:.2f}")
    return " | ".join(parts)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records :class:`MetricsWriter` wrote in ``run_dir`` (of one ``kind`` if given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


class MetricsWriter:
    """Rank 0 only: appends one JSON object per record to run_dir/metrics.jsonl and mirrors
    the numbers as TensorBoard scalars (run_dir/tensorboard)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "time", "kind") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
