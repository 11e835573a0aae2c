"""Compatibility shim for Triton's CPU interpreter (TRITON_INTERPRET=1), the CPU test path of the kernels.

Triton 3.6's interpreter turns a scalar tensor into a Python int (for `range(lo, hi)` with bounds loaded from
memory) with `int(array)` on a one-element, one-dimensional numpy array; numpy >= 2.4 refuses that. This wraps the
interpreter's tensor patching so the conversion takes the element explicitly. It changes nothing on GPUs (the
interpreter is not used there) and is a no-op if the interpreter's internals differ from what it expects.
"""

from __future__ import annotations


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
