"""One package per op family, each with reference.py, triton_kernels.py, native.py and its
autograd Function in __init__.py."""
