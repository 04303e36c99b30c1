"""attnres-megatron: Attention Residuals for Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="attnres-megatron",
    version="0.1.0",
    description="Attention Residuals (arXiv 2603.15031) for Megatron-Core training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["attnres_megatron", "attnres_megatron.*"]),
    package_data={
        "attnres_megatron.profiling": ["report_schema.json"],
        "attnres_megatron.ops": ["csrc/*.cpp", "csrc/*.h"],  # the C++ CPU kernels, compiled on first use
    },
    install_requires=[
        # CPU machines install the pinned CPU build first (constraints/cpu.txt); GPU
        # machines keep the CUDA build of torch they already have.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "psutil",  # Megatron-Core's distributed checkpointing
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "mpi": ["mpi4py"],
        "tensorboard": ["tensorboard", "matplotlib"],
        "triton": ["triton"],
        "cpu-kernels": ["ninja"],  # builds the fused C++ CPU kernels on first use
        "fla": ["flash-linear-attention"],
        "progress": ["tqdm"],  # attnres-pretrain's progress bar on a terminal
        "test": ["pytest", "ninja", "pytest-timeout", "ruff", "tensorboard", "matplotlib", "triton", "tqdm"],
    },
    entry_points={
        "console_scripts": [
            "attnres-pretrain=attnres_megatron.training.pretrain:main",
            "attnres-profile=attnres_megatron.profiling.cli:main",
        ]
    },
)
