"""Builds lmkern and its extension lmkern._C: C++ kernels always, CUDA kernels when possible.

Install with `pip install --no-build-isolation -e .`. torch must be installed first: with
build isolation pip would download a multi-GB CUDA torch just to build against it.

The CUDA kernels are built when a CUDA toolkit is found and the installed torch is a CUDA
build (no GPU is needed to build them); LMKERN_BUILD_CUDA=0 or 1 forces either way.
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100/H200).

Objects are compiled in build/temp by ninja, whichever command builds, so that a build
recompiles only what changed: pip's editable install would otherwise start in a new
temporary folder each time.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

NVCC_FLAGS = ["-O3", "-lineinfo"]
BUILD_TEMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")


def build_cuda() -> bool:
    flag = os.environ.get("LMKERN_BUILD_CUDA", "")
    if flag not in ("", "0", "1"):
        raise SystemExit(f"LMKERN_BUILD_CUDA must be 0 or 1, got {flag!r}")
    possible = CUDA_HOME is not None and torch.version.cuda is not None
    if flag == "1" and not possible:
        raise SystemExit(
            "LMKERN_BUILD_CUDA=1 needs a CUDA toolkit and a CUDA build of torch; found "
            f"CUDA_HOME={CUDA_HOME}, torch {torch.__version__} (CUDA {torch.version.cuda})"
        )
    return possible if flag == "" else flag == "1"


class IncrementalBuild(BuildExtension):
    """torch's BuildExtension with its objects in BUILD_TEMP (ninja tracks their sources,
    headers and flags, and rebuilds what they no longer match)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = BUILD_TEMP


def extension():
    sources = ["csrc/lmkern.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fopenmp-simd honours `omp simd` (vectorised reductions) without the OpenMP runtime;
    # without trapping math the compiler may vectorise branch-free selects.
    cxx_flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]
    if not build_cuda():
        return CppExtension("lmkern._C", sources, extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return CUDAExtension(
        "lmkern._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": NVCC_FLAGS},
        define_macros=[("LMKERN_WITH_CUDA", "1")],  # lmkern._C.with_cuda
    )


# Source folders and the packages they install as: models/ and benchmarks/ go inside lmkern
# (`lmkern bench` runs lmkern.benchmarks.run).
PACKAGE_DIRS = {"lmkern": "lmkern", "lmkern.models": "models", "lmkern.benchmarks": "benchmarks"}


def packages():
    """lmkern and its subpackages, plus models/ and benchmarks/ (PACKAGE_DIRS)."""
    found = []
    for name, top in PACKAGE_DIRS.items():
        for init in sorted(glob.glob(f"{top}/**/__init__.py", recursive=True)):
            sub = os.path.dirname(init)[len(top):].strip("/").replace("/", ".")
            found.append(f"{name}.{sub}" if sub else name)
    return found


setup(
    name="lmkern",
    version="0.1.0",
    description="Fused attention, LayerNorm/GELU feed-forward and cross-entropy kernels, "
    "and GPT and BERT models built on them",
    python_requires=">=3.10",
    packages=packages(),
    package_dir=PACKAGE_DIRS,
    ext_modules=[extension()],
    cmdclass={"build_ext": IncrementalBuild},
    install_requires=[
        "torch>=2.8",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",  # memory-mapped token files
        "tokenizers>=0.21",  # DecodeStream: lmkern generate streams text
        "safetensors",  # model checkpoints
        "tqdm",  # progress bars
        "matplotlib>=3.7",  # loss curves (training) and benchmark plots
    ],
    entry_points={"console_scripts": ["lmkern = lmkern.cli:main"]},
    extras_require={
        # transformers: the GPT and BERT models are checked against Hugging Face's
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "expecttest", "transformers>=5"],
        "bench": ["pytest-benchmark>=4"],
    },
)
