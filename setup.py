"""megatron-emoe: elastic Mixture-of-Experts routing (EMoE, Matryoshka MoE) for Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="megatron-emoe",
    version="0.1.0",
    description="Train MoE models once, serve them at any number of active experts (Megatron-Core)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_emoe", "megatron_emoe.*"]),
    # the local lm-eval task shipped for offline runs and tests
    package_data={"megatron_emoe.evaluation": ["tasks/*.yaml", "tasks/*.jsonl", "tasks/*.py"]},
    python_requires=">=3.12",
    entry_points={
        "console_scripts": [
            "emoe-pretrain = megatron_emoe.cli.pretrain:main",
            "emoe-build-default-data = megatron_emoe.cli.build_default_data:main",
            "emoe-preprocess-data = megatron_emoe.cli.preprocess_data:main",
            "emoe-convert-checkpoint = megatron_emoe.cli.convert_checkpoint:main",
            "emoe-finetune-hf = megatron_emoe.cli.finetune_hf:main",
            "emoe-elastic-eval = megatron_emoe.cli.elastic_eval:main",
            "emoe-search-budget-allocation = megatron_emoe.cli.search_budget_allocation:main",
            "emoe-lm-eval = megatron_emoe.cli.lm_eval_emoe:main",
        ],
    },
    install_requires=[
        "torch>=2.6",
        "megatron-core~=0.19.2",
        "numpy",
        "matplotlib",  # co-activation heatmaps (Agg backend, no display needed)
        "packaging",
        "psutil",  # dist_checkpointing needs it
        "pyyaml",  # --config files
        "tensorboard",  # router metrics and losses
        # data tools: reading JSONL/Parquet/text, Hugging Face tokenizers, progress bars
        "datasets",
        "pyarrow",
        "tokenizers",
        "transformers",
        "tqdm",
    ],
    extras_require={
        # Transformer Engine's torch binding builds from source against CUDA: GPU machines only.
        "te": ["transformer-engine[pytorch]>=2.6"],
        # Downstream tasks through EleutherAI's lm-eval (megatron_emoe.evaluation.lm_eval_adapter,
        # tools/lm_eval_emoe.py); the core package imports without it.
        "eval": ["lm_eval==0.4.13"],
        # Hugging Face fine-tuning through DeepSpeed (megatron_emoe.hf_finetune, DeepSpeed-MoE in
        # megatron_emoe.hf); install with DS_BUILD_OPS=0 on CPU machines (the Makefile does).
        "deepspeed": ["deepspeed==0.19.8"],
        # scipy: the benchmarks' seed statistics (t intervals, rank correlation) and test statistics
        "dev": ["pytest>=8", "pytest-timeout", "scipy", "lm_eval==0.4.13", "deepspeed==0.19.8"],
    },
)
