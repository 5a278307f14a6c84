from setuptools import find_packages, setup

setup(
    name="megatron_ascend",
    version="0.1.0",
    description="Megatron-style TP/SP/PP/EP/DP training of DeepSeek-family MoE models on Ascend NPUs, CUDA and CPU",
    packages=find_packages(include=["megatron_ascend", "megatron_ascend.*"]),
    python_requires=">=3.10",
    # torch is pinned to the 2.13 line: `pip install torch==2.13.0` takes the CPU build on our CI machines.
    # Ascend users install torch + torch_npu from Ascend's matrix first (see docs/ASCEND.md); CUDA users install
    # their CUDA build of torch 2.13 first. A satisfied pin installs nothing more.
    install_requires=[
        "torch==2.13.0",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "tensorboard",
        "tqdm",
        "pyarrow",  # parquet input to tools/preprocess_data.py (HuggingFace datasets' format)
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "transformers==5.24.*", "matplotlib"],
        "npu": ["torch_npu"],
        "tools": ["matplotlib"],
    },
    entry_points={"console_scripts": []},
)
