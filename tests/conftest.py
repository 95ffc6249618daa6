import os
import sys
import warnings

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/ranks.py

# Triton's interpreter runs model.fused_kernels=triton's kernels on CPU tensors
# (tests/layer/test_triton_kernels.py).  Triton picks it when a kernel is defined, its standard
# library's included, so it is set before anything imports triton (megatron-core does), and
# only where no GPU could run them.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` (optionally ``gpu(gpus=N)``): skipped, saying why, on machines with
    fewer CUDA GPUs.  ``pytest -m gpu`` selects exactly these tests."""
    found = None
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        if found is None:
            import torch

            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        need = marker.kwargs.get("gpus", 1)
        if found < need:
            item.add_marker(pytest.mark.skip(
                reason=f"needs {need} CUDA GPU{'s (NCCL)' if need > 1 else ''}, found {found}"))


@pytest.fixture
def triton_interpreter():
    """Skips where model.fused_kernels=triton's kernels cannot run on CPU tensors: no triton,
    Triton's interpreter not chosen when it was imported (a machine with a GPU), or an
    interpreter that cannot run a loop over a runtime bound, as the kernels' loops over a row
    are (Triton 3.6's, the one torch 2.11 pins, fails so with NumPy 2.5; the compiled kernels
    are not affected: test_kernels_compile_for_hopper_without_spills)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton's interpreter is off (TRITON_INTERPRET is not 1): a GPU machine")
    from triton_probe import interpreter_problem

    problem = interpreter_problem()
    if problem:
        pytest.skip(problem)
