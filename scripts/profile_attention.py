"""Run the dense FP8 forward twice at Wan-1.3B 480p, for a profiler to read the second launch:

    ncu --kernel-name regex:_fwd_kernel --launch-skip 1 --launch-count 1 \
        --section ComputeWorkloadAnalysis --section WarpStateStats --section LaunchStats --section Occupancy \
        python scripts/profile_attention.py
"""

from __future__ import annotations

import torch

from fpsa_train.fps.fp8 import QuantGranularity
from fpsa_train.fps.kernel import fps_attention
from fpsa_train.fps.schedule import Regime
from fpsa_train.models.token_order import TokenLayout

layout = TokenLayout((21, 30, 52), "tile", (6, 8, 8))
q, k, v = (torch.randn(1, 12, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
dense = Regime(name="dense", quant=QuantGranularity("tile"))  # σ ∈ [0, 1], dense
for _ in range(2):
    fps_attention(q, k, v, layout, dense)
torch.cuda.synchronize()
