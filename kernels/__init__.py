"""fpsa_kernels: Hopper FP8 tile-sparse attention kernels (Triton), imported as `fpsa_kernels`.

The folder is `kernels/` in the repository and is mapped to the import name `fpsa_kernels` by pyproject's
package-dir (a top-level `kernels` would clash with the PyPI package of that name).

- `fps_attention(q, k, v, layout, regime, mask=None, gate=None)`: the FP8 tile-sparse attention (attention.py),
  differentiable: with inputs that require grad its backward runs the Triton backward kernels (training.py);
- `quantize_qkv(q, k, v, layout, granularity)`: its quantization pre-pass alone (quant.py);
- `unsupported_reason(tensor)`: None where the kernel runs (Hopper GPUs; CPU tensors under TRITON_INTERPRET=1),
  otherwise why not.
On CPU, set TRITON_INTERPRET=1 before importing this package to run the kernels in Triton's interpreter (tests).
"""

import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from fpsa_kernels._interpreter import patch_interpreter

    patch_interpreter()

from fpsa_kernels.attention import fps_attention, unsupported_reason  # noqa: E402
from fpsa_kernels.quant import quantize_qkv  # noqa: E402

__all__ = ["fps_attention", "quantize_qkv", "unsupported_reason"]
