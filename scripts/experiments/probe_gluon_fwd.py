"""Experiment (issue 19): the variants of the Gluon forward (kernels/gluon_forward.py, whose docstring describes the
kernel), compiled for sm_90 on the CPU or timed on the H200 against the shipped Triton forward and cuDNN bf16.

Variants (`VARIANTS`, all constexpr-selected; `compile_check(name)` compiles one for sm_90 without a GPU):
    ws1_m64_s{2,3}       1 consumer warpgroup of 64 rows + loader (8 warps in all), 2/3-stage ring
    ws1_m64_s2_r128      the same under maxnreg 128 at launch (2 CTAs per SM fit; setmaxnreg moves registers)
    coop_m128_s2         1 consumer partition of 8 warps (two warpgroups on 128 rows, in lockstep) + loader
    two_m128_s{2,3,4}    2 consumer warpgroups of 64 rows sharing K/V, unordered (two_m128_s2 is the default)
The loop is the simplest schedule that can be correct: Q·Kᵀ, wait, softmax, P·V, wait. The ping-pong, bundled and
FA3-overlap schedules were measured and removed (see the kernel's docstring and docs/benchmarks.md).

Run on the H200 (each configuration in its own subprocess with a timeout: a wrong mbarrier phase hangs, a fault
poisons the CUDA context):

    source scripts/device_env.sh; python scripts/experiments/probe_gluon_fwd.py --shape 480p [--timeout 120]
    python scripts/experiments/probe_gluon_fwd.py --compile-only          # CPU: compile every variant for sm_90

It prints one JSON line per configuration: TFLOP/s, speedup over the shipped kernel and over cuDNN bf16 timed in the
same process, whether the output is finite, the SQNR of the output against the shipped kernel's (both quantize P
against a running max, so they should differ by rounding only: expect > 40 dB), and the largest lse difference.

Status: on the H200 (2026-12-02) every variant run so far is finite and within rounding of the shipped kernel
(45.1 dB, lse identical); speeds in docs/benchmarks.md ("Gluon forward"). Run `--compile-only` without
TRITON_INTERPRET set (the interpreter's helpers break Gluon compiles).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import SHAPES, TILE, bench  # noqa: E402
from isolated import run_each  # noqa: E402
from sm90 import ptxas_report  # noqa: E402

from fpsa_kernels.gluon_forward import (  # noqa: E402
    LOADER_REGS, VARIANTS, block_m, constexprs, descriptors, gluon_fwd_kernel, launch_options, run_gluon)

# ------------------------------------------------------------------------------------------------ compile check
PTX_WGMMA = "wgmma.mma_async"
PTX_SETMAXNREG = "setmaxnreg"


def compile_variant(variant: str, qk_imprecise: int = 128, edge_mask: bool = True):
    """Compile `variant` for sm_90 (no GPU needed): the CompiledKernel (asm: ttgir, ptx, cubin; metadata)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    v = VARIANTS[variant]
    f8 = torch.float8_e4m3fn
    seq, d, bh = 256, 128, 2
    q8, k8 = torch.zeros(bh, seq, d, dtype=f8), torch.zeros(bh, seq, d, dtype=f8)
    vt8 = torch.zeros(bh, d, seq, dtype=f8)
    q_desc, k_desc, v_desc = descriptors(q8, k8, vt8, seq, v["rows"])
    sig = dict(q_desc=mangle_type(q_desc), k_desc=mangle_type(k_desc), v_desc=mangle_type(v_desc),
               sq_ptr="*fp32", sk_ptr="*fp32", sv_ptr="*fp32", o_ptr="*bf16", lse_ptr="*fp32",
               item_group="*i32", item_row="*i32", item_rows="*i32", chunks="*i32", chunk_count="*i32")
    sig.update({name: "i32" for name in ("H", "L", "stride_ob", "stride_oh", "stride_ol", "mask_sb", "mask_sh",
                                         "mask_sg", "C")})
    consts = constexprs(variant, qk_imprecise, edge_mask)
    sig.update({name: "constexpr" for name in consts})
    src = GluonASTSource(gluon_fwd_kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch_options(variant))


def compile_check(variant: str, **kw) -> dict:
    """Compile `variant` for sm_90 on the CPU and check the result: a warp_specialize region with the expected warps,
    FP8 wgmma for both products with P·V taking P from registers (4 A registers, the "RS" form), the e4m3 cast with
    round-to-nearest-even, setmaxnreg for the partitions (the loader's budget among them), TMA loads and mbarrier
    waits, and what ptxas -v says for sm_90a (no spills, shared memory under
    the 227 KB limit). Raises AssertionError on a missing property; returns the facts."""
    v = VARIANTS[variant]
    k = compile_variant(variant, **kw)
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
    maxnreg = sorted(set(" ".join(m.split()) for m in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+\d+",
                                                                  ptx)))
    rs = len(re.findall(r"wgmma\.mma_async[\w.]*\s*\{[^}]*\},\s*\{%r\d+,\s*%r\d+,\s*%r\d+,\s*%r\d+\}", ptx))
    info = dict(variant=variant, num_warps=k.metadata.num_warps, shared=k.metadata.shared, wgmma=wgmma,
                wgmma_count=ptx.count(PTX_WGMMA), wgmma_p_in_registers=rs, setmaxnreg=maxnreg,
                tma=ptx.count("cp.async.bulk.tensor"), mbarrier_waits=ptx.count("mbarrier.try_wait"),
                **ptxas_report(ptx))
    partitions = v["consumers"]  # code paths with one Q·Kᵀ and one P·V each
    assert "ttg.warp_specialize" in ttgir, f"{variant}: no warp_specialize region"
    assert info["num_warps"] == v["warps"] + 4 * (v["consumers"] - 1) + 4, f"{variant}: {info['num_warps']} warps"
    assert any(w.endswith(".f32.e4m3.e4m3") for w in wgmma), f"{variant}: no FP8 wgmma in the PTX: {wgmma}"
    assert info["wgmma_count"] >= 8 * partitions, f"{variant}: {info['wgmma_count']} wgmma (4 per product)"
    assert rs >= 4 * partitions, f"{variant}: P·V does not take P from registers ({rs} RS wgmma)"
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx, f"{variant}: P is not cast to e4m3 with round-to-nearest-even"
    assert PTX_SETMAXNREG in ptx, f"{variant}: no setmaxnreg (not warp-specialised?)"
    assert any(m.endswith(f" {LOADER_REGS}") for m in maxnreg), f"{variant}: no loader budget in {maxnreg}"
    assert info["tma"] >= 2 + v["consumers"] and info["mbarrier_waits"] > 0, f"{variant}: TMA/mbarrier missing"
    assert info["ptxas_rc"] == 0, f"{variant}: ptxas failed: {info['warnings']}"
    assert not info["spill_stores"] and not info["spill_loads"], f"{variant}: ptxas spills: {info}"
    assert info["shared"] <= 232448, f"{variant}: {info['shared']} B of shared memory (H100/H200 max 227 KB)"
    return info


# ------------------------------------------------------------------------------------------------------- runner
def shipped_api():
    """(quantize(q, k, v, layout, granularity, q_mult), plan_for, attention_forward, LOG2E) of the shipped kernel."""
    from fpsa_kernels import quantize_qkv
    from fpsa_kernels.attention import attention_forward
    from fpsa_kernels.numerics import LOG2E
    from fpsa_train.fps.kernel import plan_for, quant_groups

    def quantize(q, k, v, layout, granularity, q_mult):
        return quantize_qkv(q, k, v, quant_groups(layout, granularity, q.device), q_mult=q_mult)

    return quantize, plan_for, attention_forward, LOG2E


def plans(q, k, layout, cfg: dict, plan_for):
    """(shipped plan 64×128, probe plan block_m(variant)×128): dense, or the top-k tile-aligned plan of a `keep`
    share of the tiles, as probe_ws2d.py builds them."""
    from fpsa_kernels.plan import dense_plan
    from fpsa_train.fps.masks import select_keep

    bm = block_m(cfg["variant"])
    if cfg.get("keep") is None:
        return dense_plan(q.shape[2], 64, 128, "cuda"), dense_plan(q.shape[2], bm, 128, "cuda")
    mask = select_keep(q, k, layout, max(1, round(cfg["keep"] * len(layout.tile_sizes()))))
    return plan_for(mask, layout, None, 64, 128, q.device), plan_for(mask, layout, None, bm, 128, q.device)


def one(shape: str, cfg: dict) -> dict:
    from fpsa_train.fps.fp8 import QuantGranularity
    from fpsa_train.models.token_order import TokenLayout

    quantize, plan_for, attention_forward, LOG2E = shipped_api()
    name, heads, grid = SHAPES[shape]
    layout = TokenLayout(grid, "tile", TILE)
    seq, d = layout.seq_len, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    qkv = quantize(q, k, v, layout, QuantGranularity(cfg.get("quant", "tile")), LOG2E / math.sqrt(d))
    shipped, plan = plans(q, k, layout, cfg, plan_for)
    dense = cfg.get("keep") is None
    flops = 4.0 * heads * seq * seq * d * (1.0 if dense else shipped.useful / (heads * seq * seq))
    res = {"shape": name, **cfg}
    ref, ref_lse = attention_forward(qkv, shipped, qk_imprecise_acc=None)  # = D: QK_IMPRECISE = 0's arithmetic
    res["shipped_ms"] = bench(lambda: attention_forward(qkv, shipped, qk_imprecise_acc=None))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        res["cudnn_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((heads * seq, ), float("nan"), device="cuda")
    run = lambda: run_gluon(qkv, plan, out, lse, cfg["variant"], edge_mask=cfg.get("edge_mask", True))  # noqa: E731
    run()
    torch.cuda.synchronize()
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    res.update(finite=bool(torch.isfinite(out).all()), rel_err_vs_shipped=float(err),
               sqnr_db_vs_shipped=float(-20 * math.log10(max(float(err), 1e-12))),
               lse_max_abs_diff=float((lse.view(heads, seq) - ref_lse.view(heads, seq)).abs().max()))
    res["ms"] = bench(run)
    res.update(tflops=flops / res["ms"] / 1e9, vs_shipped=res["shipped_ms"] / res["ms"],
               vs_cudnn=res["cudnn_ms"] / res["ms"])
    return res


CONFIGS = [dict(variant="ws1_m64_s2"), dict(variant="ws1_m64_s3"), dict(variant="ws1_m64_s2_r128"),
           dict(variant="ws1_m64_s2", edge_mask=False), dict(variant="coop_m128_s2"), dict(variant="two_m128_s2"),
           dict(variant="two_m128_s4"), dict(variant="two_m128_s2", quant="token"),
           dict(variant="two_m128_s2", keep=0.25), dict(variant="ws1_m64_s2", keep=0.25)]
"""Dense plans first (the bring-up order of the plan: one consumer, then two), then per-token scales
and sparse top-k plans (`keep`: share of key tiles; flops then count the kept pairs only)."""


def parse_config(text: str) -> dict:
    """`name[:key=value[;key=value]]`, e.g. `two_m128_s2:keep=0.25;quant="token"` (values are JSON)."""
    name, _, rest = text.partition(":")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    cfg = dict(variant=name)
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        cfg[key] = json.loads(value)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="480p", choices=sorted(SHAPES))
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--variants", help="comma-separated configurations, `name[:key=value;...]` (keys of a "
                                           "CONFIGS entry: keep, quant, edge_mask; default: CONFIGS)")
    parser.add_argument("--compile-only", action="store_true", help="compile every variant for sm_90 (CPU) and exit")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        for name in (args.variants.split(",") if args.variants else VARIANTS):
            try:
                print(json.dumps(compile_check(name)), flush=True)
            except Exception as e:  # noqa: BLE001 (report every variant)
                print(json.dumps({"variant": name, "failed": f"{type(e).__name__}: {e}"[:2000]}), flush=True)
        return
    if args.one:
        print(json.dumps(one(args.shape, json.loads(args.one))), flush=True)
        return
    configs = [parse_config(text) for text in args.variants.split(",")] if args.variants else CONFIGS
    run_each(__file__, args.shape, configs, args.timeout)


if __name__ == "__main__":
    main()
