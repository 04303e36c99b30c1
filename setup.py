"""attnres-megatron: Attention Residuals for Megatron-Core."""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# One place decides the tested megatron-core range; the package refuses others at import.
VERSIONS = runpy.run_path(str(ROOT / "attnres_megatron" / "compat" / "versions.py"))
MEGATRON_CORE = VERSIONS["MEGATRON_CORE_REQUIREMENT"]
# Ranges megatron-core 0.16 itself declares for its optional dependencies; Triton 3.5's CPU
# interpreter crashes on the fused kernels, 3.6 to 3.9 are tested.
TRANSFORMER_ENGINE = "transformer-engine[pytorch]>=2.9.0a0,<2.12.0"
FLA = "flash-linear-attention~=0.4.0"
TRITON = "triton>=3.6,<3.10"
# Megatron-Core's tokenizer libraries (megatron.core.tokenizers): Hugging Face (tokenizer.json or a
# pretrained directory, through transformers' AutoTokenizer; no torch extras), tiktoken and
# SentencePiece. The default byte-level tokenizer needs none of them.
TOKENIZERS = ["transformers", "tokenizers", "sentencepiece", "tiktoken"]
# tools/convert_hf.py: safetensors weights, the byte-level tokenizer.json, transformers' tokenizers and
# the exported model's modeling files.
HUGGING_FACE = ["transformers", "tokenizers", "safetensors"]

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
        MEGATRON_CORE,
        "numpy",
        "packaging",  # the megatron-core version check
        "psutil",  # Megatron-Core's distributed checkpointing
    ],
    extras_require={
        "te": [TRANSFORMER_ENGINE],
        "mpi": ["mpi4py"],
        "tensorboard": ["tensorboard", "matplotlib"],
        "triton": [TRITON],
        "cpu-kernels": ["ninja"],  # builds the fused C++ CPU kernels on first use
        "fla": [FLA],
        "progress": ["tqdm"],  # attnres-pretrain's progress bar on a terminal
        "megatron-lm": ["six"],  # what Megatron-LM's training loop imports beyond megatron-core's needs
        "tokenizers": TOKENIZERS,  # --tokenizer-type HuggingFaceTokenizer / TikTokenizer / SentencePiece
        "hf": HUGGING_FACE,  # Hugging Face export and import (tools/convert_hf.py)
        "test": [
            "pytest",
            "pytest-timeout",
            "ruff",
            "ninja",
            "tensorboard",
            "matplotlib",
            TRITON,
            "tqdm",
            "jsonschema",  # the profiler report is validated by jsonschema and the built-in checker
            "six",  # the megatron-lm extra: the Megatron-LM-loop tests (MEGATRON_LM_DIR) import it
            *TOKENIZERS,
            "safetensors",  # the hf extra's one package beyond the tokenizers extra
        ],
    },
    entry_points={
        "console_scripts": [
            "attnres-pretrain=attnres_megatron.training.pretrain:main",
            "attnres-profile=attnres_megatron.profiling.cli:main",
            "attnres-generate=attnres_megatron.inference.cli:main",
        ]
    },
)
