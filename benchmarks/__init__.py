"""lmkern's benchmark suite: `python -m benchmarks.run [--op NAME] [--quick]`."""
