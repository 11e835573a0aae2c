"""The kernels' tuning knobs: block shapes, warps and pipeline stages of the forward and the backward.

None changes the definition of what is computed, only roundings: block shapes move where the forward's running row
max meets a chunk edge (a value of P may round once more, as attention.py's docstring bounds), and they and the warps
may reorder fp32 sums; `qk_imprecise_acc` sets the precision of the Q·Kᵀ accumulation. Each default names the
measurement that chose it (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARDS = ("triton", "gluon")


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64
    """Query rows per forward program (at most 256). 64 × 128 (one warpgroup, 4 warps, 2 stages) was the fastest of
    scripts/bench_attention.py's sweep on the H100: 626 TFLOP/s dense at Wan 1.3B-480p against 453 for 128 × 128."""
    block_n: int = 128
    """Keys per forward chunk: a multiple of 16 (chunk starts are 16-aligned) and at most 128 (the plan packs a
    chunk's columns in 8 bits). From the same sweep as block_m."""
    num_warps: int = 4
    """Warps per forward program; from the same sweep."""
    num_stages: int = 2
    """Pipeline stages of the forward; from the same sweep (the 14B-720p row there ran 3: 607 TFLOP/s dense, and
    3 stages were up to 4% faster on top-k masks at 480p; the default stayed 2)."""
    qk_imprecise_acc: int | None = None
    """None: the FP8 Q·Kᵀ accumulates in the tensor cores' reduced precision (about 14 bits; Triton's default).
    32 promotes it to fp32 after every 32 products: 16% slower in the forward at 480p (docs/benchmarks.md). That
    reduced precision is most of the backward's error at video-like inputs' large logits ("Precision" there); the
    promotion was not measured in the backward."""
    forward: str = "triton"
    """Which forward runs an inference call (no gradient): "triton" (attention.py, at block_m × block_n) or "gluon"
    (gluon_forward.py: warp-specialised, its own 128 × 128 blocks, D = 128 on Hopper only; 1.16× the Triton forward
    dense at 1.3B-480p on the H200, docs/benchmarks.md "Gluon forward"). A call that needs gradients always runs
    the Triton forward, which saves the statistics the backward needs."""
    gluon_variant: str | None = None
    """The Gluon forward's schedule, a key of gluon_forward.VARIANTS whose plan is 128 × 128 (attention.GLUON_BLOCK);
    None: gluon_forward.DEFAULT_VARIANT, the fastest measured. For experiments and the GPU tests of each variant."""
    bwd_blocks: tuple[int, int, int, int] = (64, 128, 64, 32)
    """(dQ kernel query rows, its key chunk, dK/dV kernel key rows, its query chunk); chunks are multiples of 16.
    The fastest of a sweep at dense 480p forward + backward on the H100: 122.3 ms against 142.0 for 64×64×64×64;
    8 warps, larger dK/dV blocks and 3 stages were slower (125–270 ms)."""
    bwd_warps: int = 4
    """Warps per backward program; from the bwd_blocks sweep."""
    bwd_stages: int = 2
    """Pipeline stages of the backward kernels; from the bwd_blocks sweep."""

    def __post_init__(self) -> None:
        if self.forward not in FORWARDS:
            raise ValueError(f"forward={self.forward!r}: expected one of {FORWARDS}")
        if len(self.bwd_blocks) != 4:
            raise ValueError(f"bwd_blocks must be (dQ rows, dQ key chunk, dK/dV rows, dK/dV query chunk), got "
                             f"{self.bwd_blocks!r}")
        object.__setattr__(self, "bwd_blocks", tuple(int(b) for b in self.bwd_blocks))
