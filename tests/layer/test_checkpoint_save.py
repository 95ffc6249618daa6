"""checkpoint.save / load in one process: a synchronous save starts no helper process, and what
it wrote restores the model and the optimizer's moments exactly."""

import multiprocessing
import queue
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _built(seed: int):
    from megatron_coe.config import load_config
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model

    config = load_config(ROOT / "configs" / "tiny" / "coe.yaml",
                         ["parallel.expert=1", "model.seq_length=32", f"seed={seed}"])
    model = wrap_model(config, build_model(config))
    optimizer, scheduler = build_optimizer(config, model)
    return config, model, optimizer, scheduler


def _train_one_step(model, optimizer):
    from megatron_coe import cpu

    model.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = torch.randint(0, 200, (2, 32))
    out = model(tokens, torch.arange(32)[None].expand(2, -1), None, labels=tokens)
    out.float().mean().backward()
    model.finish_grad_sync()
    with torch.no_grad(), cpu.cuda_to_cpu():
        assert optimizer.step()[0]


def _adam_moments(optimizer):
    from megatron_coe.checkpoint import torch_optimizers

    return [(key, opt.state[p][key].clone()) for opt in torch_optimizers(optimizer)
            for group in opt.param_groups for p in group["params"]
            for key in sorted(opt.state[p]) if torch.is_tensor(opt.state[p][key])]


def test_save_starts_no_process_and_load_restores_model_and_optimizer(tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_coe import checkpoint

    config, model, optimizer, scheduler = _built(seed=1)
    _train_one_step(model, optimizer)
    filesystem_async._results_queue = None  # as in a fresh process
    seen = []
    get_queue = filesystem_async.get_write_results_queue
    monkeypatch.setattr(filesystem_async, "get_write_results_queue",
                        lambda *a, **k: seen.append(get_queue(*a, **k)) or seen[-1])
    path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, config, {"step": 1})
    # Megatron's default would have started a multiprocessing Manager (a spawned server
    # process) to carry the write results of this synchronous save
    assert not [p for p in multiprocessing.active_children() if "Manager" in p.name]
    assert seen and all(isinstance(q, queue.Queue) for q in seen)
    assert filesystem_async._results_queue is None  # Megatron's own state put back

    _, other, other_opt, other_sched = _built(seed=2)
    _train_one_step(other, other_opt)
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert checkpoint.load(path, other, other_opt, other_sched, config) == {"step": 1}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    moments, restored = _adam_moments(optimizer), _adam_moments(other_opt)
    assert len(moments) == len(restored) > 0
    assert {key for key, _ in moments} >= {"exp_avg", "exp_avg_sq"}
    for (key, a), (other_key, b) in zip(moments, restored):
        assert key == other_key and torch.equal(a, b), key


def test_rng_tracker_states_resume_across_the_plain_and_graph_safe_forms(tmp_path):
    """train.cuda_graph makes Megatron's RNG tracker hold generators (the graph-safe form) where
    it otherwise holds state tensors: a checkpoint keeps tensors either way (weights-only
    loadable), and restoring sets a graph-safe tracker's generators in place, the objects a
    CUDA graph registered."""
    from megatron.core import tensor_parallel

    from megatron_coe.checkpoint import _rng_state, _set_rng_state

    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = tracker.get_states()
    try:
        plain = torch.Generator().manual_seed(5).get_state()
        tracker.set_states({"a": plain})
        torch.save(_rng_state(), tmp_path / "plain.pt")
        draws = torch.rand(4, generator=torch.Generator().manual_seed(5))

        graph_safe = torch.Generator().manual_seed(7)
        tracker.set_states({"a": graph_safe})
        _set_rng_state(torch.load(tmp_path / "plain.pt", weights_only=True))
        assert tracker.get_states()["a"] is graph_safe
        assert torch.equal(torch.rand(4, generator=graph_safe), draws)

        graph_safe.manual_seed(9)
        torch.save(_rng_state(), tmp_path / "graph_safe.pt")
        expected = torch.rand(4, generator=torch.Generator().manual_seed(9))
        tracker.set_states({"a": plain})
        _set_rng_state(torch.load(tmp_path / "graph_safe.pt", weights_only=True))
        restored = torch.Generator()
        restored.set_state(tracker.get_states()["a"])
        assert torch.equal(torch.rand(4, generator=restored), expected)
    finally:
        tracker.set_states(before)
