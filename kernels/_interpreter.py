"""Triton's CPU interpreter (TRITON_INTERPRET=1), the CPU test path of the kernels: whether it runs, and shims.

Two bugs of Triton 3.6's interpreter, each fixed where it lives; nothing changes on GPUs (the interpreter is not
used there), and each shim is a no-op if the interpreter's internals differ from what it expects:
- it turns a scalar tensor into a Python int (for `range(lo, hi)` with bounds loaded from memory) with
  `int(array)` on a one-element, one-dimensional numpy array; numpy >= 2.4 refuses that: the conversion takes the
  element explicitly;
- `tl.dot` of bf16 operands multiplies their storage (bf16 is held as uint16 bit patterns) as integers: the
  operands are widened to fp32 first (exact), the accumulation stays fp32 as on the GPU.
"""

from __future__ import annotations

import os


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def patch_interpreter() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fpsa_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._fpsa_patched = True
    interpreter._patch_lang_tensor = patched
    _patch_bf16_dot(interpreter)


def _patch_bf16_dot(interpreter) -> None:
    builder = getattr(interpreter, "InterpreterBuilder", None)
    convert = getattr(interpreter, "_convert_float", None)
    if builder is None or convert is None or not hasattr(builder, "create_dot"):
        return
    import numpy as np
    import triton.language as tl

    original = builder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle(convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
