"""Compile-check lmkern's CUDA sources on a machine without a GPU (CI runs this).

- csrc/cuda/*_kernels.cu, pure CUDA: compiled by nvcc for sm_80 and sm_90 with the flags
  torch's extension build gives nvcc, and ptxas's report (-Xptxas -v): each kernel that
  spills registers is listed with its spilled bytes (the check does not fail on spills).
- csrc/cuda/*.cpp, the thin torch bindings: syntax-checked by the host compiler against
  torch's and the CUDA runtime's headers. A CPU build of torch ships its CUDA headers
  without one generated file (c10/cuda/impl/cuda_cmake_macros.h); a stand-in is written
  to a temporary include directory when it is missing.

    python scripts/check_cuda.py
"""

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

ARCHS = ("80", "90")


def find_cuda_home():
    """The CUDA toolkit: $CUDA_HOME, around the nvcc on PATH, or /usr/local/cuda (torch's
    own CUDA_HOME is None in a CPU build of torch)."""
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
        "/usr/local/cuda",
    ]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvcc_commands(cuda_home, out_dir):
    for source in sorted(glob.glob("csrc/cuda/*_kernels.cu")):
        for arch in ARCHS:
            output = os.path.join(out_dir, f"{os.path.basename(source)}.sm_{arch}.o")
            yield [
                os.path.join(cuda_home, "bin", "nvcc"), *COMMON_NVCC_FLAGS, "-O3", "-std=c++17",
                f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "-c", source, "-o", output,
            ]


def binding_commands(cuda_home, stub_dir):
    includes = [*include_paths(), os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"], stub_dir]
    for source in sorted(glob.glob("csrc/cuda/*.cpp")):
        yield ["c++", "-std=c++20", "-fsyntax-only", *(f"-I{path}" for path in includes), source]


def write_missing_cmake_macros(stub_dir):
    relative = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if any(os.path.exists(os.path.join(path, relative)) for path in include_paths()):
        return
    os.makedirs(os.path.join(stub_dir, os.path.dirname(relative)))
    with open(os.path.join(stub_dir, relative), "w") as header:
        header.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")


def spills(ptxas_report):
    """[(kernel, spilled bytes)] for the kernels that spill, from ptxas -v's report (names
    demangled when c++filt is there)."""
    found = []
    pattern = r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
    for name, stores, loads in re.findall(pattern, ptxas_report, flags=re.S):
        if int(stores) + int(loads):
            found.append((name, int(stores) + int(loads)))
    if found and shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(n for n, _ in found), capture_output=True, text=True)
        found = [(demangled, size) for demangled, (_, size) in zip(names.stdout.splitlines(), found)]
    return found


def run(command):
    result = subprocess.run(command, capture_output=True, text=True)
    return command, result


def main():
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("no CUDA toolkit found (no nvcc on PATH, no $CUDA_HOME): nothing checked", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        write_missing_cmake_macros(scratch)
        commands = [*nvcc_commands(cuda_home, scratch), *binding_commands(cuda_home, scratch)]
        failed = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
            for command, result in pool.map(run, commands):
                source = next(arg for arg in command if arg.startswith("csrc/"))
                arch = next((arg.split("=")[-1] for arg in command if arg.startswith("-gencode")), "host")
                spilled = spills(result.stderr) if arch != "host" else []
                print(f"{'ok' if result.returncode == 0 else 'FAILED':<6} {source} ({arch})"
                      + (f", {len(spilled)} kernels spill:" if spilled else ""))
                for kernel, size in spilled:
                    print(f"         {size} bytes: {kernel}")
                if result.returncode != 0:
                    failed += 1
                    print(result.stdout + result.stderr, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
