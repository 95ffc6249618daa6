import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py, tests/ranks.py
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` (optionally ``gpu(gpus=N)``): skipped, saying why, on machines with
    fewer CUDA GPUs.  ``pytest -m gpu`` selects exactly these tests."""
    import pytest

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
                reason=f"needs {need} CUDA GPU{'s' if need > 1 else ''} (NCCL), found {found}"))
