"""fpsa_kernels: Hopper FP8 tile-sparse attention kernels (Triton), imported as `fpsa_kernels`.

The folder is `kernels/` in the repository and is mapped to the import name `fpsa_kernels` by pyproject's
package-dir (a top-level `kernels` would clash with the PyPI package of that name). It takes tensors, scale groups
and plans, and imports nothing of the training framework, whose fps/kernel.py turns a token layout and a regime of
the schedule into these inputs (`fps_attention` there).

- `fp8_attention(q, k, v, groups, plan, gate=None, gate_tiles=None, config=KernelConfig())`: the FP8 tile-sparse
  attention (attention.py), differentiable: with inputs that require grad its backward runs the Triton backward
  kernels (backward.py);
- `quantize_qkv(q, k, v, groups, q_mult=1.0)`: its quantization pre-pass alone (quant.py), with `QuantGroups`, the
  tokens that share a Q/K scale;
- `Plan`, `dense_plan`, `sparse_plan`: which tile pairs the kernel computes (plan.py);
- `KernelConfig`: block shapes, warps and stages, and which forward runs inference calls (config.py): the Triton
  one (attention.py) or the warp-specialised Gluon one (gluon_forward.py; Hopper, D = 128, not imported until used);
- `unsupported_reason(tensor)`: None where the kernel runs (Hopper GPUs; CPU tensors under TRITON_INTERPRET=1),
  otherwise why not.
On CPU, set TRITON_INTERPRET=1 before importing this package to run the kernels in Triton's interpreter (tests).
"""

import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from fpsa_kernels._interpreter import patch_interpreter

    patch_interpreter()

from fpsa_kernels.attention import fp8_attention, unsupported_reason  # noqa: E402
from fpsa_kernels.config import KernelConfig  # noqa: E402
from fpsa_kernels.plan import Plan, dense_plan, sparse_plan  # noqa: E402
from fpsa_kernels.quant import QuantGroups, quantize_qkv  # noqa: E402

__all__ = ["KernelConfig", "Plan", "QuantGroups", "dense_plan", "fp8_attention", "quantize_qkv", "sparse_plan",
           "unsupported_reason"]
