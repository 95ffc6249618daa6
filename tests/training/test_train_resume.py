"""coe-train on 2 CPU ranks (EP = 2): the loss falls; a run split by a checkpoint and resumed
matches the straight run bit for bit at every step (both optimizers); the tiny run's losses
match the checked-in reference step by step."""

import json
from pathlib import Path

import pytest

from runner import check, metrics, torchrun

STEPS = 24
COMMON = [f"train.steps={STEPS}", "train.eval_interval=12", "checkpoint.save_interval=0"]
REFERENCE = Path(__file__).parent / "reference_losses.json"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    check(torchrun([f"run_dir={run_dir}", *COMMON]))
    return run_dir


def test_loss_falls_clearly(straight):
    losses = [metrics(straight)[s]["loss"] for s in range(1, STEPS + 1)]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.0 and last < first - 1.5, (first, last)
    valid = metrics(straight, "valid")
    assert set(valid) == {12, STEPS} and valid[STEPS]["loss"] < valid[12]["loss"]
    # the run directory holds the resolved config, logs, TensorBoard events, a checkpoint
    assert (straight / "config.yaml").is_file()
    assert list((straight / "tensorboard").glob("events.*"))
    assert (straight / "checkpoints" / f"step_{STEPS:07d}" / "coe_meta.json").is_file()
    line = metrics(straight)[STEPS]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mem_gib",
                "coe/iter1/aux_loss", "coe/iter2/load_max", "coe/iter2/load_min"):
        assert key in line, key


def test_losses_match_checked_in_reference(straight):
    """A change in numerics shows up here.  Tolerance 1e-3: CPU kernels may differ in the last
    bits between machines; real regressions move the loss far more."""
    reference = json.loads(REFERENCE.read_text())
    got = metrics(straight)
    for step, loss in reference["train_loss"].items():
        assert abs(got[int(step)]["loss"] - loss) < 1e-3, (step, got[int(step)]["loss"], loss)


def test_overlapped_schedule_trains_bit_identically(tmp_path, straight):
    """parallel.overlap_expert_comm=true through the whole model, DDP and optimizer: every
    step's loss and gradient norm, and the validation loss, have the plain run's bits."""
    run_dir = tmp_path / "overlap"
    check(torchrun([f"run_dir={run_dir}", *COMMON, "parallel.overlap_expert_comm=true"]))
    a, b = metrics(straight), metrics(run_dir)
    for step in range(1, STEPS + 1):
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"])
    assert metrics(straight, "valid")[STEPS]["loss"] == metrics(run_dir, "valid")[STEPS]["loss"]


def test_context_parallel_matches_data_parallel(tmp_path, straight):
    """parallel.context=2 (each rank holds 2 of a sequence's 4 chunks; keys and values
    all-gathered; rotary embeddings sliced to match) trains like the straight run, where data
    parallelism gives each rank whole sequences: same global batch, same experts (EP = 2)."""
    run_dir = tmp_path / "cp"
    check(torchrun([f"run_dir={run_dir}", *COMMON, "parallel.context=2", "train.exit_interval=6"]))
    a, b = metrics(straight), metrics(run_dir)
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-5, (step, a[step], b[step])
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) < 1e-5 * a[step]["grad_norm"]


def test_fp16_loss_scaling_recovers_and_resumes_exactly(tmp_path, straight):
    """precision=fp16 with Megatron's dynamic loss scaler, started too high on purpose: the
    first steps overflow, are skipped (not counted as non-finite) and lower the scale; then the
    loss falls like the fp32 run's.  Split by a checkpoint, it matches the straight fp16 run bit
    for bit, loss scale included (the scaler's state is in the checkpoint)."""
    fp16 = [*COMMON, "precision=fp16", "optimizer.initial_loss_scale=16777216",
            "optimizer.hysteresis=1"]
    base, split = tmp_path / "base", tmp_path / "split"
    check(torchrun([f"run_dir={base}", *fp16]))
    check(torchrun([f"run_dir={split}", *fp16, f"train.exit_interval={STEPS // 2}"]))
    check(torchrun([f"run_dir={split}", *fp16]))
    a, b, ref = metrics(base), metrics(split), metrics(straight)
    for step in range(1, STEPS + 1):
        for key in ("loss", "loss_scale", "grad_norm", "overflow_steps"):  # nan: an overflow
            assert repr(a[step][key]) == repr(b[step][key]), (step, key)
    overflows = a[STEPS]["overflow_steps"]
    assert 1 <= overflows <= 8 and a[STEPS]["skipped_steps"] == 0
    assert a[STEPS]["loss_scale"] < 16777216
    # after the overflows, training tracks fp32 (which had those steps to itself)
    assert a[STEPS]["loss"] < a[1]["loss"] - 1.0
    assert abs(a[STEPS]["loss"] - ref[STEPS - overflows]["loss"]) < 0.15


# torch's fused AdamW (CPU kernel), whose update runs on the device (optim_step.py), with the
# distributed optimizer
FUSED_DISTRIBUTED = ["optimizer.distributed=true", "optimizer.fused=true"]


@pytest.fixture(scope="module")
def fused_distributed(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fused-distributed")
    check(torchrun([f"run_dir={run_dir}", *COMMON, *FUSED_DISTRIBUTED]))
    return run_dir


@pytest.mark.parametrize("opt", [[], ["optimizer.distributed=true"], FUSED_DISTRIBUTED],
                         ids=["adam", "distributed-adam", "distributed-fused-adam-on-device"])
def test_resume_is_exact(tmp_path, opt, straight, request):
    if opt == FUSED_DISTRIBUTED:
        base = request.getfixturevalue("fused_distributed")
    elif opt:  # the straight baseline for this optimizer
        base = tmp_path / "base"
        check(torchrun([f"run_dir={base}", *COMMON, *opt]))
    else:
        base = straight
    split = tmp_path / "split"
    check(torchrun([f"run_dir={split}", *COMMON, *opt, f"train.exit_interval={STEPS // 2}"]))
    assert sorted(metrics(split)) == list(range(1, STEPS // 2 + 1))
    result = torchrun([f"run_dir={split}", *COMMON, *opt])
    check(result)
    assert f"resumed from {split}/checkpoints/step_{STEPS // 2:07d}" in result.stdout
    a, b = metrics(base), metrics(split)
    for step in range(1, STEPS + 1):
        assert a[step]["loss"] == b[step]["loss"], step          # same bits
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
    assert metrics(base, "valid")[STEPS]["loss"] == metrics(split, "valid")[STEPS]["loss"]


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-adam"])
def test_the_step_on_the_device_trains_as_megatrons_step(tmp_path, distributed, straight,
                                                         request):
    """torch's fused AdamW with the step on the device (optim_step.py) against the straight
    run's per-tensor AdamW under Megatron's step, at EP = 2 (a dense and an expert optimizer,
    each norm reduced over its own group; the distributed optimizer's shards over all ranks):
    the same gradient norm at the first step, the same losses within the rounding of two AdamW
    kernels."""
    if distributed:
        run_dir = request.getfixturevalue("fused_distributed")
    else:
        run_dir = tmp_path / "fused"
        check(torchrun([f"run_dir={run_dir}", *COMMON, "optimizer.fused=true"]))
    a, b = metrics(straight), metrics(run_dir)
    assert b[1]["grad_norm"] == pytest.approx(a[1]["grad_norm"], rel=1e-6)
    for step in range(1, STEPS + 1):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-3), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-2), step


MORE = [f"train.steps={STEPS + 3}", "train.eval_interval=0", "checkpoint.save_interval=0"]


@pytest.fixture(scope="module")
def resumed_in_own_layout(tmp_path_factory, straight):
    """The straight run's checkpoint resumed for 3 more steps in its own layout (2 ranks)."""
    import shutil

    same = tmp_path_factory.mktemp("same") / "run"
    shutil.copytree(straight, same)
    check(torchrun([f"run_dir={same}", *MORE]))
    return same


@pytest.mark.parametrize("layout", [["parallel.expert=4"], ["parallel.expert=2"]],
                         ids=["ep4-dp4", "ep2-dp4"])
def test_resume_into_another_parallel_layout(tmp_path, straight, resumed_in_own_layout, layout):
    """The 2-rank EP = 2 checkpoint of the straight run, resumed on 4 ranks (Megatron reshards
    model and optimizer; micro-batches of 2 instead of 4), trains on with the same losses as
    resuming it in its own layout (float tolerance: reduction orders differ)."""
    import shutil

    same, other = resumed_in_own_layout, tmp_path / "other"
    shutil.copytree(straight, other)
    result = torchrun([f"run_dir={other}", *MORE, "train.micro_batch_size=2", *layout], nproc=4)
    check(result)
    assert f"resumed from {other}/checkpoints/step_{STEPS:07d}" in result.stdout
    a, b = metrics(same), metrics(other)
    for step in range(STEPS + 1, STEPS + 4):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-4 * a[step]["loss"], step


def test_expert_parallel_on_off_change_is_refused_clearly(tmp_path, straight):
    import shutil

    run_dir = tmp_path / "pp"
    shutil.copytree(straight, run_dir)
    result = torchrun([f"run_dir={run_dir}", f"train.steps={STEPS + 2}", "parallel.pipeline=2",
                       "parallel.expert=1"])
    assert result.returncode != 0
    assert "cannot be loaded into this one" in result.stderr


def test_async_saves_resume_exactly(tmp_path, straight):
    """checkpoint.async_save=true: a save at step 6 written in the background while training
    goes on, then an exit right after the step-12 save (finalized before the process ends).
    Both are complete checkpoints, and resuming from step 12 reproduces the straight run's
    losses bit for bit."""
    split = tmp_path / "async"
    first = torchrun([f"run_dir={split}", *COMMON, "checkpoint.async_save=true",
                      "checkpoint.save_interval=6", f"train.exit_interval={STEPS // 2}"])
    check(first)
    assert "written in the background" in first.stdout
    ckpts = split / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000006", "step_0000012"]
    check(torchrun([f"run_dir={split}", *COMMON, "checkpoint.async_save=true"]))
    a, b = metrics(straight), metrics(split)
    for step in range(1, STEPS + 1):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step


def test_resume_switches_between_per_expert_and_grouped_experts(tmp_path, straight):
    """Checkpoints interchange between the two expert implementations: saved with per-expert
    GEMMs (LocalExperts), resumed with grouped experts (GroupedExperts, the straight run's),
    saved, resumed per expert again: every step tracks the straight run.  Gradients are the
    same bits; the gradient norm sums E per-expert tensors or one stack, so it (and through
    clipping the update) may differ in the last bits: 1e-6 relative.  A lost or misplaced
    optimizer state would move the loss by far more.  With the distributed optimizer (state in
    gradient-buffer order) the switch is refused by name."""
    run_dir = tmp_path / "switch"
    for grouped, stop in (("false", 8), ("true", 16), ("false", 0)):
        result = torchrun([f"run_dir={run_dir}", *COMMON, f"model.moe.grouped_gemm={grouped}",
                           f"train.exit_interval={stop}"])
        check(result)
    assert f"resumed from {run_dir}/checkpoints/step_{16:07d}" in result.stdout
    a, b = metrics(straight), metrics(run_dir)
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6 * a[step][key], (step, key)
    distributed = tmp_path / "distributed"
    opt = ["optimizer.distributed=true"]
    check(torchrun([f"run_dir={distributed}", *COMMON, *opt, "model.moe.grouped_gemm=false",
                    "train.exit_interval=4"]))
    result = torchrun([f"run_dir={distributed}", *COMMON, *opt, "model.moe.grouped_gemm=true"])
    assert result.returncode != 0
    assert "resume with model.moe.grouped_gemm=false" in result.stderr


def test_profiled_steps_write_a_trace_and_change_no_result(tmp_path, straight):
    """train.profile_steps=[2, 4] on rank 0, the run split by an exit at step 3: the first part
    writes steps 2-3 (a gzipped Chrome trace, each step's span named, and a table of the ops'
    time), the resumed part step 4; rank 1 writes nothing; and steps 1-4 have the straight
    run's bits: profiling changes nothing."""
    import gzip

    run_dir = tmp_path / "profiled"
    profiled = [f"run_dir={run_dir}", *COMMON, "train.profile_steps=[2,4]"]
    for stop, written in ((3, "2-3"), (4, "4-4")):
        result = torchrun([*profiled, f"train.exit_interval={stop}"])
        check(result)
        trace = run_dir / "profile" / f"rank0_steps{written}.json.gz"
        assert f"[rank 0] steps {written} profiled: {trace}" in result.stdout
    assert sorted(p.name for p in (run_dir / "profile").iterdir()) == [
        "rank0_steps2-3.json.gz", "rank0_steps2-3.txt", "rank0_steps4-4.json.gz",
        "rank0_steps4-4.txt"]
    events = json.loads(gzip.decompress((run_dir / "profile/rank0_steps2-3.json.gz").read_bytes()))
    spans = {e["name"] for e in events["traceEvents"] if e.get("name", "").startswith("train step")}
    assert spans == {"train step 2", "train step 3"}
    assert "aten::mm" in {e.get("name") for e in events["traceEvents"]}
    assert "aten::mm" in (run_dir / "profile/rank0_steps2-3.txt").read_text()
    a, b = metrics(straight), metrics(run_dir)
    assert sorted(b) == [1, 2, 3, 4]
    for step in b:
        assert (a[step]["loss"], a[step]["grad_norm"]) == (b[step]["loss"], b[step]["grad_norm"])
