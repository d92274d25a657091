"""GPT and BERT models built on lmkern's kernels (installed as lmkern.models)."""
