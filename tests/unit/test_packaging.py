"""Static checks of the Dockerfile and packaging (no Docker engine here): the NGC base image is
pinned, the pinned megatron-core matches setup.py, this package and its entry points are
installed, and everything the Dockerfile copies exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dockerfile_pins_base_image_and_installs_package():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base.startswith("nvcr.io/nvidia/pytorch:")
    tag = base.split(":", 1)[1]
    assert re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"base image tag not pinned: {tag}"
    setup = (ROOT / "setup.py").read_text()
    pin = re.search(r'"megatron-core==([\d.]+)"', setup).group(1)
    assert f"megatron-core=={pin}" in text, "Dockerfile and setup.py pin different megatron-core"
    assert re.search(r"pip install [^\n]*-e \.", text), "the package itself is not installed"
    assert "import megatron_coe" in text and "transformer_engine" in text
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"Dockerfile copies missing {item}"


def test_entry_points_exist():
    import importlib

    setup = (ROOT / "setup.py").read_text()
    scripts = dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', setup))
    assert {"coe-train", "coe-preprocess"} <= scripts.keys()
    for target in scripts.values():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    assert re.search(r'python_requires=">=3\.12"', setup)


def test_launchers_are_executable_and_pass_arguments_through():
    for script in ("launch/torchrun.sh", "launch/slurm/coe.sbatch", "launch/venv.sh",
                   "launch/slurm/rank_env.sh"):
        path = ROOT / script
        assert path.stat().st_mode & 0o111, f"{script} is not executable"
        assert "eval " not in path.read_text(), f"{script} evaluates its input"
