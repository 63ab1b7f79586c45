"""Build and install hybrimoe.

`pip install -e .` installs the `hybrimoe` package and builds, from the sources under kernels/:
  * kernels/cpu/*.cpp   -> the pybind11 extension `hybrimoe._cpu` (run-time tier selection inside;
                           the AVX-512 code is compiled with per-function target attributes, so the
                           module imports on any x86-64 CPU and on other architectures too);
  * kernels/triton/     -> packaged as `hybrimoe.triton_kernels` (Python, JIT-compiled by Triton);
  * kernels/cuda/       -> packaged as data (`hybrimoe.cuda_kernels`), compiled at run time with
                           torch's cpp_extension where CUDA exists.
There is deliberately no top-level package named `kernels` (Hugging Face ships one).
"""
import glob
import os
import platform

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpu_extension():
    sources = sorted(glob.glob(os.path.join("kernels", "cpu", "*.cpp")))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    args = ["-O3", "-fno-math-errno", "-fvisibility=hidden"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        # Baseline only: AVX2/AVX-512 kernels enable their ISA per function (target attributes)
        # and are chosen at run time by CPUID, never by the compiler's -march.
        args += ["-mno-avx512f"]
    return [
        Pybind11Extension(
            "hybrimoe._cpu",
            sources,
            include_dirs=[os.path.join("kernels", "cpu")],
            cxx_std=17,
            extra_compile_args=args,
            extra_link_args=["-pthread"],
            depends=glob.glob(os.path.join("kernels", "cpu", "*.h")),
        )
    ]


def _build_ext():
    try:
        from pybind11.setup_helpers import build_ext
    except ImportError:  # pragma: no cover - pybind11 is a build requirement
        from setuptools.command.build_ext import build_ext
    return build_ext


setup(
    name="hybrimoe",
    version="0.1.0",
    description="Hybrid CPU-GPU inference for Mixture-of-Experts GGUF models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["hybrimoe", "hybrimoe.triton_kernels", "hybrimoe.cuda_kernels"],
    package_dir={
        "hybrimoe": "hybrimoe",
        "hybrimoe.triton_kernels": "kernels/triton",
        "hybrimoe.cuda_kernels": "kernels/cuda",
    },
    package_data={
        "hybrimoe.triton_kernels": ["*.json"],
        "hybrimoe.cuda_kernels": ["*.cu", "*.cuh", "*.h"],
        "hybrimoe": ["data/*"],
    },
    ext_modules=_cpu_extension(),
    cmdclass={"build_ext": _build_ext()},
    install_requires=[
        "torch>=2.4",
        "numpy>=1.26",
        "gguf>=0.17",
        # Tested releases (the GPU box's): transformers' model classes and Triton's interpreter
        # change between minor releases (transformers 5.24 moved its GGUF tokenizer converters;
        # triton 3.9's interpreter rejects masks 3.6 accepts), so the ranges stop at what we test.
        "transformers>=5.17,<5.18",
        "tqdm",
        # Triton kernels run on GPUs and, for tests, in Triton's CPU interpreter (Linux wheels).
        "triton>=3.6,<3.7; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "matplotlib"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["hybrimoe-generate=hybrimoe.generate:main"]},
    zip_safe=False,
)
