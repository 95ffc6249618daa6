"""Packaging for megatron-coe: Chain-of-Experts pretraining on Megatron-Core."""

from setuptools import find_packages, setup

# transformer-engine and apex are deliberately NOT listed in install_requires:
#   * transformer-engine's PyTorch extension has to be compiled against CUDA,
#     so a plain `pip install` on a CPU-only or mismatched machine fails;
#   * apex is not published on PyPI at all.
# Both come preinstalled in the NGC PyTorch container (see Dockerfile), and
# megatron_coe imports them lazily so that CPU-only tests run without them.

setup(
    name="megatron-coe",
    version="0.1.0",
    description="Chain-of-Experts language model pretraining on NVIDIA Megatron-Core",
    packages=find_packages(include=["megatron_coe", "megatron_coe.*"]),
    python_requires=">=3.12",  # megatron-core 0.19.2 requires Python 3.12
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",
        "numpy",
        "pyyaml>=6",
        "psutil",
        "nvidia-ml-py",
        "tensorboard",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis"]},
    entry_points={
        "console_scripts": [
            "coe-train=megatron_coe.train:main",
            "coe-preprocess=megatron_coe.data.preprocess:main",
            "coe-smoke=megatron_coe.smoke:main",
            "coe-compare=megatron_coe.tools.compare:main",
            "coe-routing=megatron_coe.tools.routing:main",
        ],
    },
)
