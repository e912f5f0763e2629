"""Triton kernels, installed as ``msfin_fast.kernels``.

One op per module: the ``@triton.jit`` kernel and a small launcher that checks shapes and dtypes.
Each module opens with its contract (layout, dtypes, what it fuses, what it leaves to the next op).
"""
