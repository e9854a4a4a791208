"""Build and install retina_fast.

The compiled core ``retina_fast._C`` is built by CMake (see CMakeLists.txt): C++17 with OpenMP, plus the
CUDA sources in ``csrc/cuda`` when a CUDA toolkit is found.  It does not link libtorch; tensors cross the
boundary as NumPy buffers (CPU) or raw device pointers with an explicit stream (CUDA).

Build switches (environment variables, read only here and in CMake):
  RETINA_FAST_NATIVE=1        compile for the host CPU (-march=native) instead of portable x86-64 with
                              runtime dispatch
  RETINA_FAST_CUDA=0|1        force the CUDA part off / on (default: on when nvcc is found)
  RETINA_FAST_CUDA_ARCHS=90   CUDA architectures (default "90": H100/H200; keeps CI builds fast)
  RETINA_FAST_BUILD_TYPE      CMake build type (default Release)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path) -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = os.environ.get("RETINA_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DRETINA_FAST_NATIVE={'ON' if os.environ.get('RETINA_FAST_NATIVE') == '1' else 'OFF'}",
            f"-DRETINA_FAST_CUDA_ARCHS={os.environ.get('RETINA_FAST_CUDA_ARCHS', '90')}",
        ]
        if "RETINA_FAST_CUDA" in os.environ:
            args.append(f"-DRETINA_FAST_CUDA={'ON' if os.environ['RETINA_FAST_CUDA'] == '1' else 'OFF'}")
        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if _has("ninja") else []
        subprocess.run(["cmake", ext.source_dir, *generator, *args], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


def _has(program: str) -> bool:
    from shutil import which

    return which(program) is not None


setup(
    name="retina_fast",
    version="0.1.0",
    description="Fast, reproducible sampling of 16-band hyperspectral retinal images and fundus enhancement",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "retina_fast",
        "retina_fast.backends",
        "retina_fast.commands",
        "retina_fast.metrics",
        "retina_fast.models",
        "retina_fast.ops",
        "retina_fast.kernels",
        "retina_fast.training",
    ],
    package_dir={
        "retina_fast": "retina_fast",
        "retina_fast.kernels": "kernels",
        "retina_fast.training": "training",
    },
    package_data={"retina_fast": ["weights/*/*.json", "weights/*/*.safetensors", "weights/*/*.md",
                                  "weights/*/*.csv", "data/*"]},
    ext_modules=[CMakeExtension("retina_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9.0",
    ],
    extras_require={
        # Triton kernels (the `cuda` backend; CPU tests run them under TRITON_INTERPRET=1).
        "gpu": ["triton>=3.0"],
        "io": ["tifffile>=2023.1", "h5py>=3.8"],
        # ONNX export, the onnxruntime CPU backend (and TensorRT engines are built from these exports)
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],
        "eval": ["scipy>=1.10", "scikit-image>=0.21", "matplotlib>=3.6"],
        "test": [
            "pytest>=7.4",
            "pytest-benchmark>=4.0",
            "pytorch-msssim>=1.0",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "triton>=3.0",
            "tifffile>=2023.1",
            "h5py>=3.8",
            "scipy>=1.10",
            "scikit-image>=0.21",
            "matplotlib>=3.6",
        ],
    },
    entry_points={"console_scripts": ["retina-fast=retina_fast.cli:main"]},
)
