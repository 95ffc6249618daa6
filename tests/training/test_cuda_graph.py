"""train.cuda_graph=full_iteration on one GPU: after the warm-up every training step is a replay
of one captured CUDA graph, and the run trains as the eager one does (the same kernels in the
same order: the same losses, up to the GPU's non-deterministic reductions, hence 1e-2 and not
0), validation and a fault-injected step in between included.  bf16, as the graph needs for
MoE layers (config.py).  ``pytest -m gpu``; skipped without a GPU.  CPU-side checks: the
config refusals (tests/unit/test_config.py), the checkpoint's RNG states
(tests/layer/test_checkpoint_save.py), and the step's host reads (tests/layer/test_host_work.py)."""

import pytest

from runner import check, metrics, torchrun


@pytest.mark.gpu
def test_graph_replays_train_as_the_eager_run(tmp_path):
    common = ["device=cuda", "precision=bf16", "parallel.expert=1", "train.steps=9",
              "train.eval_interval=4", "train.tensorboard=false", "checkpoint.save_final=false",
              "train.inject_nonfinite_steps=[6]"]
    runs = {}
    for graph in ("none", "full_iteration"):
        run_dir = tmp_path / graph
        result = torchrun([*common, f"run_dir={run_dir}", f"train.cuda_graph={graph}"],
                          nproc=1)
        check(result)
        assert ("is captured as a CUDA graph after 2 eager steps" in result.stdout) == (
            graph == "full_iteration")
        runs[graph] = (metrics(run_dir), metrics(run_dir, "valid"))
    (eager, eager_valid), (graphed, graphed_valid) = runs["none"], runs["full_iteration"]
    assert sorted(graphed) == list(range(1, 10))
    for step in eager:
        if step == 6:  # the injected NaN: skipped in both
            assert graphed[step]["skipped_steps"] == eager[step]["skipped_steps"] == 1
            continue
        # a replay that lost gradients or read stale inputs would be off by far more
        assert graphed[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-2), step
        assert graphed[step]["grad_norm"] == pytest.approx(eager[step]["grad_norm"], rel=1e-2)
    assert [v["loss"] for v in graphed_valid.values()] == pytest.approx(
        [v["loss"] for v in eager_valid.values()], abs=1e-2)


@pytest.mark.gpu
def test_profiled_replays_record_the_graphs_kernels(tmp_path):
    """train.profile_steps after the capture: the trace of two replayed steps holds both steps'
    spans and the GPU kernels the graph launched."""
    import gzip
    import json

    run_dir = tmp_path / "profiled"
    check(torchrun(["device=cuda", "precision=bf16", "parallel.expert=1", "train.steps=5",
                    "train.eval_interval=0", "train.tensorboard=false",
                    "checkpoint.save_final=false", "train.cuda_graph=full_iteration",
                    "train.profile_steps=[4,5]", f"run_dir={run_dir}"], nproc=1))
    events = json.loads(gzip.decompress(
        (run_dir / "profile" / "rank0_steps4-5.json.gz").read_bytes()))["traceEvents"]
    assert {e["name"] for e in events if e.get("name", "").startswith("train step")} == {
        "train step 4", "train step 5"}
    assert sum(e.get("cat") == "kernel" for e in events) > 100
