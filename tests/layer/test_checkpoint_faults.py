"""Checkpoints in one process, against what a first day can throw at them: crafted files that
would run code on load, a resume with changed learning rates or a longer schedule, an
unwritable checkpoint directory, a full disk mid-save, a damaged newest checkpoint, and
asynchronous saves (snapshot semantics; complete or absent at every moment)."""

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch

from test_checkpoint_save import _built, _train_one_step


def _files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real checkpoint of the tiny CoE model after one optimizer step."""
    from megatron_coe import checkpoint

    root = tmp_path_factory.mktemp("saved")
    config, model, optimizer, scheduler = _built(seed=1)
    _train_one_step(model, optimizer)
    scheduler.step(1)
    path = checkpoint.save(root, 1, model, optimizer, scheduler, config, {"step": 1})
    return path


@pytest.fixture
def copy(saved, tmp_path):
    dest = tmp_path / "checkpoints" / saved.name
    shutil.copytree(saved, dest)
    return dest


def _rewrite_manifest(ckpt: Path, name: str) -> None:
    """What an attacker does after editing a file: the manifest is not a signature."""
    meta = json.loads((ckpt / "coe_meta.json").read_text())
    data = (ckpt / name).read_bytes()
    meta["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
    (ckpt / "coe_meta.json").write_text(json.dumps(meta))


class _Payload:
    """Unpickling this creates a directory: stands for any code a crafted file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _load_both_ways(ckpt: Path):
    """The training resume path and the coe-routing (weights only) path."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_coe import checkpoint

    config, model, optimizer, scheduler = _built(seed=2)
    errors = []
    for load in (lambda: checkpoint.load(ckpt, model, optimizer, scheduler, config),
                 lambda: checkpoint.load_model(ckpt, model, config)):
        try:
            load()
            errors.append(None)
        except (Exception, CheckpointException) as err:  # torch's is a BaseException
            errors.append(err)
    return errors


def _refused(errors, marker):
    from megatron_coe import checkpoint

    assert not marker.exists(), "the crafted file ran its code"
    assert all(isinstance(e, checkpoint.CheckpointError) for e in errors), errors
    return [str(e) for e in errors]


def test_crafted_metadata_does_not_run_and_is_refused(copy, tmp_path):
    marker = tmp_path / "payload_ran"
    (copy / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rewrite_manifest(copy, ".metadata")
    for message in _refused(_load_both_ways(copy), marker):
        assert "refused: .metadata refers to posix.mkdir" in message, message
        assert "load only checkpoints you trust" in message.lower()


def test_crafted_non_tensor_item_does_not_run_and_is_refused(copy, tmp_path):
    """Megatron's common state (optimizer parameter groups etc.) is a pickled item inside a
    shard file; point its index entry at a payload appended to the shard."""
    marker = tmp_path / "payload_ran"
    metadata = pickle.loads((copy / ".metadata").read_bytes())
    (index, info), = [(k, v) for k, v in metadata.storage_data.items()
                      if k.fqn.startswith("common_state")]
    shard = copy / info.relative_path
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    offset = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(payload.getvalue())
    info.offset, info.length = offset, len(payload.getvalue())
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    for name in (".metadata", info.relative_path):
        _rewrite_manifest(copy, name)
    errors = _refused(_load_both_ways(copy), marker)
    assert "refused: item common_state/shard_0_1 is not plain data" in errors[0], errors[0]


def test_untouched_checkpoint_passes_the_restricted_reader(copy):
    """The allow-list is not so tight that a real checkpoint is refused (both load paths)."""
    from megatron_coe import checkpoint

    config, model, optimizer, scheduler = _built(seed=2)
    assert checkpoint.load(copy, model, optimizer, scheduler, config) == {"step": 1}
    assert checkpoint.load_model(copy, model, config)["step"] == 1


@pytest.mark.parametrize("override, named", [
    ("optimizer.lr=0.002", "optimizer.lr: checkpoint 0.003 vs config 0.002"),
    ("optimizer.min_lr=0.0001", "optimizer.min_lr: checkpoint 0.0003 vs config 0.0001"),
])
def test_changed_learning_rate_is_named_before_loading(copy, override, named):
    from megatron_coe import checkpoint
    from megatron_coe.config import load_config
    from test_checkpoint_save import ROOT

    config, model, optimizer, scheduler = _built(seed=2)
    changed = load_config(ROOT / "configs" / "tiny" / "coe.yaml",
                          ["parallel.expert=1", "model.seq_length=32", override])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load(copy, model, optimizer, scheduler, changed)
    message = str(err.value)
    assert named in message and "optimizer.lr=0.003 optimizer.min_lr=0.0003" in message, message
    assert "parallel layout" not in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing read


def test_longer_run_stretches_the_schedule_like_override_opt_param_scheduler(tmp_path, capsys):
    """40 steps saved, resumed with train.steps=60: step 41 uses the lr a 60-step schedule
    has at step 41 (not min_lr, which a 40-step schedule ends at), and start-up says so."""
    from megatron_coe import checkpoint
    from megatron_coe.config import load_config
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model
    from test_checkpoint_save import ROOT

    def built(steps, seed):
        config = load_config(ROOT / "configs" / "tiny" / "coe.yaml",
                             ["parallel.expert=1", "model.seq_length=32", f"seed={seed}",
                              f"train.steps={steps}", "schedule.decay=cosine"])
        model = wrap_model(config, build_model(config))
        return (config, model, *build_optimizer(config, model))

    config, model, optimizer, scheduler = built(40, 1)
    _train_one_step(model, optimizer)  # Adam state to save
    for _ in range(40):
        scheduler.step(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(config.optimizer.min_lr)
    path = checkpoint.save(tmp_path, 40, model, optimizer, scheduler, config, {"step": 40})

    config60, model60, optimizer60, scheduler60 = built(60, 2)
    checkpoint.load(path, model60, optimizer60, scheduler60, config60)
    _, _, reference_opt, reference = built(60, 3)
    for _ in range(40):
        reference.step(1)
    lr41 = optimizer60.param_groups[0]["lr"]
    assert lr41 == reference_opt.param_groups[0]["lr"]
    assert lr41 > 2 * config60.optimizer.min_lr
    assert "decay steps (train.steps) 40 -> 60" in capsys.readouterr().out


def test_checkpoint_directory_that_is_a_file_is_refused(tmp_path):
    from megatron_coe import checkpoint

    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="is a file, not a directory"):
        checkpoint.check_writable(tmp_path / "checkpoints")


def test_read_only_checkpoint_directory_is_refused(tmp_path, monkeypatch):
    from megatron_coe import checkpoint

    root = tmp_path / "checkpoints"
    root.mkdir()
    root.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: make the write probe meet what a user meets
        import tempfile

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(root))
        monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(checkpoint.CheckpointError,
                           match=f"checkpoint directory {root} is not writable"):
            checkpoint.check_writable(root)
    finally:
        root.chmod(0o755)
    monkeypatch.undo()
    checkpoint.check_writable(tmp_path / "fresh" / "checkpoints")  # a usable one passes


def test_full_disk_mid_save_is_named_cleaned_up_and_keeps_the_last_checkpoint(copy, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_coe import checkpoint

    root = copy.parent
    before = _files(root)
    config, model, optimizer, scheduler = _built(seed=1)

    def disk_full(transforms, stream, *args, **kwargs):
        stream.write(b"\0" * 100)  # a partial file, as a filling disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.save(root, 2, model, optimizer, scheduler, config, {"step": 2})
    message = str(err.value)
    assert "no space left on device" in message and str(root / ".tmp_step_0000002") in message
    assert f"the last complete checkpoint, {copy}, is intact" in message
    assert _files(root) == before  # no partial files; step 1 untouched
    assert checkpoint.read_meta(copy)["step"] == 1


def test_newest_checkpoint_without_its_metadata_is_refused_not_overwritten(tmp_path):
    from megatron_coe import checkpoint
    from megatron_coe.config import load_config
    from test_checkpoint_save import ROOT

    root = tmp_path / "checkpoints"
    for step in (20, 40):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "coe_meta.json").write_text("{}")
    (root / "step_0000040" / "coe_meta.json").unlink()
    config = load_config(ROOT / "configs" / "tiny" / "coe.yaml", ["parallel.expert=1"])
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.find_resume(config, root)
    assert "step_0000040, is incomplete: coe_meta.json is missing" in str(err.value)
    assert f"checkpoint.resume={root / 'step_0000020'}" in str(err.value)
    # the roll-back it suggests keeps the damaged one aside instead of overwriting it later
    moved = checkpoint.set_aside_newer(root, 20)
    assert [p.name for p in moved] == ["step_0000040"] and not (root / "step_0000040").exists()


def _async_config():
    from megatron_coe.config import load_config
    from test_checkpoint_save import ROOT

    return load_config(ROOT / "configs" / "tiny" / "coe.yaml",
                       ["parallel.expert=1", "model.seq_length=32", "seed=1",
                        "checkpoint.async_save=true"])


def test_async_save_snapshots_the_step_and_is_complete_or_absent(saved, tmp_path, monkeypatch):
    """The writer is held mid-write while training changes every weight: meanwhile the
    directory holds no new checkpoint resume could pick; once finalized, the checkpoint has the
    weights and Adam moments of the save step, not the later ones."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync)

    from megatron_coe import checkpoint
    from test_checkpoint_save import _adam_moments

    root = tmp_path / "checkpoints"
    shutil.copytree(saved, root / saved.name)
    _, model, optimizer, scheduler = _built(seed=1)
    config = _async_config()
    scheduler.step(2)  # past the first warmup step's lr of 0, so that a step moves the weights
    _train_one_step(model, optimizer)
    at_save = [p.detach().clone() for p in model.parameters()]
    moments = _adam_moments(optimizer)

    release, writing = threading.Event(), threading.Event()
    original = FileSystemWriterAsync.write_preloaded_data

    def held(*args, **kwargs):
        writing.set()
        release.wait(60)
        return original(*args, **kwargs)
    monkeypatch.setattr(FileSystemWriterAsync, "write_preloaded_data", staticmethod(held))

    saver = checkpoint.Saver(root, config)
    assert saver.save(2, model, optimizer, scheduler, {"step": 2}) is None
    assert writing.wait(60)
    _train_one_step(model, optimizer)  # training goes on while the writer runs
    assert saver.poll() is None  # still writing: not finalized
    # what a kill at this moment would leave: the old checkpoint is the one resume picks
    assert checkpoint.list_checkpoints(root) == [root / saved.name]
    assert checkpoint.find_resume(config, root) == root / saved.name
    release.set()
    path = saver.finish()
    assert path == root / "step_0000002" and checkpoint.list_checkpoints(root)[-1] == path
    assert not list(root.glob(".tmp_step_*"))

    _, other, other_opt, other_sched = _built(seed=2)
    assert checkpoint.load(path, other, other_opt, other_sched, config) == {"step": 2}
    assert all(torch.equal(a, b) for a, b in zip(at_save, other.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(at_save, model.parameters()))
    for (key, a), (other_key, b) in zip(moments, _adam_moments(other_opt)):
        assert key == other_key and torch.equal(a, b), key


def test_model_definition_of_an_older_checkpoint_lacks_new_keys_and_still_matches():
    """A checkpoint that predates a model key (saved without it) matches while the key is at
    its default; the layer implementation (model.impl) is not part of the model; a real change
    is refused by name."""
    from megatron_coe.checkpoint import CheckpointError, check_compatible, model_definition
    from megatron_coe.config import config_from_dict

    config = config_from_dict({"model": {"impl": "local", "moe": {}, "coe": {}}})
    older = model_definition(config)
    assert "impl" not in older
    older["coe"].pop("router")
    check_compatible({"model": older}, config, Path("step_0000001"))
    changed = model_definition(config)
    changed["coe"] = dict(changed["coe"], iterations=3)
    with pytest.raises(CheckpointError, match="model.coe.iterations"):
        check_compatible({"model": changed}, config, Path("step_0000001"))


def test_distributed_optimizer_state_from_before_grouped_experts_is_not_loaded_into_them():
    """Checkpoints without a grouped_experts record had per-expert weights: with the
    distributed optimizer (state in gradient-buffer order) a resume into grouped experts (the
    CPU default now) is refused by name, not loaded onto the wrong parameters."""
    from megatron_coe.checkpoint import CheckpointError, check_optimizer_layout
    from megatron_coe.config import config_from_dict

    config = config_from_dict({"model": {"moe": {}, "coe": {}},
                               "optimizer": {"distributed": True}})
    with pytest.raises(CheckpointError, match="model.moe.grouped_gemm=false"):
        check_optimizer_layout({}, config, Path("step_0000001"))
    check_optimizer_layout({"grouped_experts": True}, config, Path("step_0000001"))
