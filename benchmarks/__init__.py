"""lmkern's benchmark suite: `python -m benchmarks.run [--op NAME] [--quick]` in a checkout,
installed as lmkern.benchmarks (`lmkern bench`)."""
