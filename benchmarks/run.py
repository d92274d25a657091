"""Runs the benchmark suite: prints each op's table and writes its result files
(benchmarks/report.py) to benchmarks/results/<device>/.

    python -m benchmarks.run [--op NAME ...] [--quick | --short] [--device cpu|cuda] [--out DIR]
    lmkern bench [...]       the same, from the installed package lmkern.benchmarks

A case that raises is recorded with its error in the result files, and the run exits 1
once every op has run (one that runs out of memory is recorded as such, not an error).
--short runs only each op's largest full size (the case the GPU check's summary reports),
to fit a short GPU lease. --quick runs small sizes as a smoke test (CI does); its files go to
benchmarks/results/<device>/quick/ unless --out says otherwise. Run from an installed
package rather than a checkout, the files go under ./lmkern-benchmarks/ instead: an
installed package's folder is no place for them.
"""

import argparse
import os
import sys

import torch

from . import (
    bench_add_layer_norm,
    bench_apply_rotary,
    bench_attention,
    bench_attention_with_kv_cache,
    bench_bert_infer,
    bench_bert_train,
    bench_cross_entropy,
    bench_ffn,
    bench_gpt_generate,
    bench_gpt_train,
    bench_layer_norm,
    bench_linear_cross_entropy,
    bench_linear_gelu,
    bench_llama_generate,
    bench_llama_train,
    bench_rms_norm,
    bench_swiglu,
    bench_t5_train,
    report,
)
from .harness import HERE, run_op

OPS = {
    module.OP: module
    for module in (
        bench_cross_entropy,
        bench_linear_cross_entropy,
        bench_layer_norm,
        bench_add_layer_norm,
        bench_rms_norm,
        bench_linear_gelu,
        bench_ffn,
        bench_swiglu,
        bench_attention,
        bench_attention_with_kv_cache,
        bench_apply_rotary,
        bench_gpt_train,
        bench_gpt_generate,
        bench_llama_train,
        bench_t5_train,
        bench_llama_generate,
        bench_bert_train,
        bench_bert_infer,
    )
}


def results_folder():
    """benchmarks/results in a checkout (setup.py beside this package), else
    ./lmkern-benchmarks."""
    if os.path.exists(os.path.join(os.path.dirname(HERE), "setup.py")):
        return os.path.join(HERE, "results")
    return os.path.abspath("lmkern-benchmarks")


def main(argv=None):
    """argv: the arguments (default: the command line's); returns the exit status."""
    parser = argparse.ArgumentParser(description="lmkern's benchmark suite")
    parser.add_argument("--op", action="append", choices=list(OPS), help="run only this op (repeatable)")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    sizes.add_argument("--short", action="store_true", help="each op's largest full size only")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="folder for the result files")
    args = parser.parse_args(argv)
    errors = []
    for name in args.op or OPS:
        module = OPS[name]
        short_cases = module.cases(args.device, False)[-1:] if args.short else None
        result = run_op(module, args.device, args.quick, cases=short_cases)
        folder = args.out or os.path.join(results_folder(), result["device_slug"], "quick" if args.quick else "")
        paths = report.write(result, folder)
        print()
        print(report.markdown(result))
        print("wrote " + ", ".join(paths))
        errors += [f"{name} {row['label']} {row['provider']}: {row['error']}" for row in result["rows"] if "error" in row]
    if errors:  # every op ran; the run still fails
        print(f"\n{len(errors)} benchmark case(s) raised:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
