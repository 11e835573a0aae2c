"""Experiment: the quantization pre-pass (kernels/quant.py `quantize_qkv`) against the memory floor, on one GPU.

    python scripts/experiments/bench_prepass.py --out $OUT/prepass.json [--shapes 480p,720p] [--reps 20] [--sweep]
    python scripts/experiments/bench_prepass.py --dry-run        # CPU: the same run at a tiny shape, interpreted
    python scripts/experiments/bench_prepass.py --compile-only   # CPU: every launch compiled for sm_90 (ptxas -v)

Per shape (bench_attention.py's: 480p B=1 H=12 L=32,760; 720p B=1 H=40 L=75,600; D=128, tiles 6×8×8) and Q/K scale
granularity (token; tile; subtile 2,2,2 = 48-token groups; tiles 2,2,2 = 3,072-token groups, as
configs/fps/default.yaml spells them), on q, k, v from torch.randn in bf16 laid out as the model passes them ((B, L,
H, D) memory viewed as (B, H, L, D)):
- `new`: `quantize_qkv`; `before`: the pre-pass as it was before this rewrite (commit 0d0e7bf, copied below);
- `copy`: the bandwidth reference, torch casting q, k, v to float8 into (B, H, L, D) buffers: the same bytes read
  and written as the pre-pass, with no scales;
- milliseconds (CUDA events around `--inner` calls, median of `--reps` samples after warmup), effective GB/s
  ((bytes read once + bytes written) / time) and the ratio to `copy`;
- whether the outputs are bit for bit the reference's (fpsa_train/fps/fp8.py: scales, and the e4m3 bytes of its
  rounding) and the `before` pre-pass's (but for the sign of zero, which it lost: `differences`);
- the GPU time of each kernel of `new` (profiler), in the JSON and the log lines.
`--sweep` also times variants of the block sizes (quant.Blocks; a few minutes). Writes JSON (--out) and prints a
markdown table.

`--compile-only` compiles the launches a 480p and a 720p call makes (each granularity) for sm_90 without a GPU
(meta tensors give the arguments' specialisations) and checks the PTX: no register spills (ptxas -v), the hardware
e4m3 cast, 16-byte loads. Run it without TRITON_INTERPRET (the interpreter's helpers break compiles).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run in its CPU interpreter

import argparse
import json
import math
import platform
import re
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from bench_attention import SHAPES, TILE  # noqa: E402
from sm90 import ptxas_report  # noqa: E402

from fpsa_kernels import quant  # noqa: E402
from fpsa_kernels.numerics import AMAX_FLOOR, E4M3_MAX, LOG2E, round_e4m3  # noqa: E402
from fpsa_train.fps.fp8 import QuantGranularity, qk_scales, v_scales  # noqa: E402
from fpsa_train.fps.fp8 import round_e4m3 as reference_round  # noqa: E402
from fpsa_train.fps.kernel import quant_groups  # noqa: E402
from fpsa_train.models.token_order import TokenLayout  # noqa: E402

GRANULARITIES = {"token": QuantGranularity("token"), "tile": QuantGranularity("tile"),
                 "subtile": QuantGranularity("subtile", (2, 2, 2)), "tiles": QuantGranularity("tiles", (2, 2, 2))}
DRY_SHAPE = ("tiny", 2, (9, 9, 17), (4, 4, 8), 32)
"""--dry-run: B=1, H=2, a 9×9×17 grid (L = 1,377, not a multiple of 16) of 4×4×8 tiles, D = 32: partial groups
everywhere, and 2×2×2 tiles of 1,024 tokens, so the chunked path runs too."""
SWEEP = {"sub64": quant.Blocks(sub_rows=64), "sub256": quant.Blocks(sub_rows=256),
         "group128": quant.Blocks(group_rows=128), "token32": quant.Blocks(token_rows=32),
         "token128": quant.Blocks(token_rows=128), "v128": quant.Blocks(v_rows=128),
         "vblocks16": quant.Blocks(v_amax_blocks=16), "ept128": quant.Blocks(elements_per_thread=128)}
"""--sweep: one block size changed from the defaults each (ept128: half the warps)."""


# ---------------------------------------------------------------------------- the pre-pass before (commit 0d0e7bf)
@triton.jit
def _before_group_kernel(x_ptr, x8_ptr, s_ptr, order_ptr, goff_ptr, H, L, stride_b, stride_h, stride_l, mult,
                         FLOOR: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr):
    g = tl.program_id(0)
    bh = tl.program_id(1)
    lo = tl.load(goff_ptr + g)
    hi = tl.load(goff_ptr + g + 1)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    d = tl.arange(0, D)
    amax = tl.zeros([BLOCK_T], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = tl.load(order_ptr + t, mask=t < hi, other=0)
        x = tl.load(src + tok[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < hi)[:, None], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), E4M3_MAX)
    dst = x8_ptr + bh.to(tl.int64) * L * D
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tok = tl.load(order_ptr + t, mask=t < hi, other=0)
        x = tl.load(src + tok[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < hi)[:, None], other=0.0)
        y = round_e4m3(tl.div_rn(x.to(tl.float32), scale))
        tl.store(dst + tok[:, None].to(tl.int64) * D + d[None, :], y.to(tl.float8e4nv), mask=(t < hi)[:, None])
        tl.store(s_ptr + bh.to(tl.int64) * L + tok, tl.zeros([BLOCK_T], tl.float32) + scale * mult, mask=t < hi)


@triton.jit
def _before_token_kernel(x_ptr, x8_ptr, s_ptr, H, L, stride_b, stride_h, stride_l, mult,
                         FLOOR: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    x = x.to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR), E4M3_MAX)
    y = round_e4m3(tl.div_rn(x, scale[:, None]))
    tl.store(x8_ptr + bh.to(tl.int64) * L * D + t[:, None] * D + d[None, :], y.to(tl.float8e4nv),
             mask=(t < L)[:, None])
    tl.store(s_ptr + bh.to(tl.int64) * L + t, scale * mult, mask=t < L)


@triton.jit
def _before_v_amax_kernel(x_ptr, part_ptr, H, L, stride_b, stride_h, stride_l, BLOCK_T: tl.constexpr,
                          D: tl.constexpr):
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    tl.store(part_ptr + (bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * D + d,
             tl.max(tl.abs(x.to(tl.float32)), axis=0))


@triton.jit
def _before_v_quant_kernel(x_ptr, vt_ptr, sv_ptr, H, L, L_pad, stride_b, stride_h, stride_l,
                           BLOCK_T: tl.constexpr, D: tl.constexpr):
    bh = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    src = x_ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h
    x = tl.load(src + t[:, None].to(tl.int64) * stride_l + d[None, :], mask=(t < L)[:, None], other=0.0)
    scale = tl.load(sv_ptr + bh * D + d)
    y = round_e4m3(tl.div_rn(x.to(tl.float32), scale[None, :])).to(tl.float8e4nv)
    tl.store(vt_ptr + bh.to(tl.int64) * D * L_pad + d[:, None] * L_pad + t[None, :], tl.trans(y),
             mask=(t < L_pad)[None, :])


def before_quantize_qkv(q, k, v, groups: quant.QuantGroups, q_mult: float = 1.0) -> quant.QuantizedQKV:
    """The pre-pass before the rewrite: a program per (group, b·h) looping 32 tokens at a time twice, V's amax
    partials reduced by torch; five kernel launches and three torch ops."""
    b, h, seq, d = q.shape
    outs = []
    for x, mult in ((q, q_mult), (k, 1.0)):
        x8 = torch.empty(b * h, seq, d, dtype=torch.float8_e4m3fn, device=x.device)
        scale = torch.empty(b * h, seq, dtype=torch.float32, device=x.device)
        strides = (x.stride(0), x.stride(1), x.stride(2))
        if groups.tokens is None:
            _before_token_kernel[(triton.cdiv(seq, 32), b * h)](x, x8, scale, h, seq, *strides, mult,
                                                                FLOOR=AMAX_FLOOR, BLOCK_T=32, D=d)
        else:
            _before_group_kernel[(groups.offsets.numel() - 1, b * h)](
                x, x8, scale, groups.tokens, groups.offsets, h, seq, *strides, mult, FLOOR=AMAX_FLOOR, BLOCK_T=32,
                D=d)
        outs += [x8, scale]
    n_blocks = triton.cdiv(seq, 64)
    strides = (v.stride(0), v.stride(1), v.stride(2))
    part = torch.empty(b * h, n_blocks, d, dtype=torch.float32, device=v.device)
    _before_v_amax_kernel[(n_blocks, b * h)](v, part, h, seq, *strides, BLOCK_T=64, D=d)
    sv = part.amax(1).clamp_min(AMAX_FLOOR) / E4M3_MAX.value
    seq_pad = triton.cdiv(seq, 16) * 16
    vt8 = torch.empty(b * h, d, seq_pad, dtype=torch.float8_e4m3fn, device=v.device)
    _before_v_quant_kernel[(triton.cdiv(seq_pad, 64), b * h)](v, vt8, sv, h, seq, seq_pad, *strides, BLOCK_T=64,
                                                              D=d)
    return quant.QuantizedQKV(outs[0], outs[2], vt8, outs[1], outs[3], sv, b, h)


# ------------------------------------------------------------------------------------------------------ checking
def reference_bytes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The e4m3 bytes of fps/fp8.py's quantization of x (B, H, L, D) with scales broadcasting against it."""
    return reference_round(x.float() / scale).to(torch.float8_e4m3fn).view(torch.uint8)


def mismatches(out: quant.QuantizedQKV, q, k, v, layout: TokenLayout, granularity: QuantGranularity,
               q_mult: float) -> list[str]:
    """The outputs of `out` that are not bit for bit fps/fp8.py's (empty: all are)."""
    b, h, seq, d = q.shape
    bad = []
    for name, x, x8, s, mult in (("q", q, out.q8, out.sq, q_mult), ("k", k, out.k8, out.sk, 1.0)):
        ref_scale = qk_scales(x, layout, granularity, name)  # (B, H, L, 1)
        if not torch.equal(s.view(b, h, seq, 1), ref_scale * torch.tensor(mult, dtype=torch.float32)):
            bad.append(f"s{name}")
        if not torch.equal(x8.view(torch.uint8).view(b, h, seq, d), reference_bytes(x, ref_scale)):
            bad.append(f"{name}8")
    ref_sv = v_scales(v)  # (B, H, 1, D)
    if not torch.equal(out.sv.view(b, h, 1, d), ref_sv):
        bad.append("sv")
    vt = out.vt8.view(torch.uint8)
    if not (torch.equal(vt[..., :seq].transpose(1, 2).reshape(b, h, seq, d), reference_bytes(v, ref_sv))
            and not vt[..., seq:].any()):
        bad.append("vt8")
    return bad


def differences(a: quant.QuantizedQKV, b: quant.QuantizedQKV, signed_zeros: bool = True) -> list[str]:
    """The outputs that differ between two pre-passes, bytes compared (fp8 as uint8). `signed_zeros=False`: e4m3
    -0 (0x80) counts as +0, for the pre-pass before, whose fp32 rounding made +0 of negative values that round to
    zero where the reference's cast (and now the pre-pass) keeps -0."""
    def raw(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float8_e4m3fn:
            return t
        t = t.view(torch.uint8)
        return t if signed_zeros else torch.where(t == 0x80, 0, t)

    return [n for n in ("q8", "k8", "vt8", "sq", "sk", "sv") if not torch.equal(raw(getattr(a, n)), raw(getattr(b, n)))]


# ------------------------------------------------------------------------------------------------------- timing
def timed_ms(fn, reps: int, inner: int, warmup: int = 2) -> float:
    """Median milliseconds per call over `reps` samples of `inner` back-to-back calls (CUDA events; on the CPU, the
    wall clock), after `warmup` samples."""
    cuda = torch.cuda.is_available()
    samples = []
    for rep in range(reps + warmup):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if rep >= warmup:
            samples.append(ms / inner)
    return statistics.median(samples)


def kernel_us(fn, calls: int = 10) -> dict[str, float]:
    """GPU microseconds per call of each kernel `fn` launches (the profiler's device time, averaged over `calls`)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key[:80]: round(e.self_device_time_total / calls, 1) for e in prof.key_averages()
            if e.self_device_time_total > 0}


def model_layout(batch: int, heads: int, seq: int, d: int, device, seed: int):
    """q, k, v bf16 (B, H, L, D) as the model passes them: (B, L, H, D) memory transposed (wan.py SelfAttention)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(batch, seq, heads, d, device=device, dtype=torch.bfloat16, generator=g).transpose(1, 2)
                 for _ in range(3))


def run_case(shape: str, gran_name: str, q, k, v, layout: TokenLayout, reps: int, inner: int, warmup: int,
             sweep: bool, log) -> dict:
    b, h, seq, d = q.shape
    granularity = GRANULARITIES[gran_name]
    groups = quant_groups(layout, granularity, q.device)
    q_mult = LOG2E / math.sqrt(d)  # as the forwards pass it
    new = quant.quantize_qkv(q, k, v, groups, q_mult)
    before = before_quantize_qkv(q, k, v, groups, q_mult)
    n_groups = 0 if groups.tokens is None else groups.offsets.numel() - 1
    row = {"shape": shape, "granularity": gran_name, "groups": n_groups,
           "max_group": groups.max_size, "new_vs_reference": mismatches(new, q, k, v, layout, granularity, q_mult),
           "new_vs_before": differences(new, before, signed_zeros=False)}
    del new, before
    n = b * h * seq * d
    row["bytes"] = 3 * n * q.element_size() + 3 * n + 2 * b * h * seq * 4 + b * h * d * 4
    row["new_ms"] = timed_ms(lambda: quant.quantize_qkv(q, k, v, groups, q_mult), reps, inner, warmup)
    row["before_ms"] = timed_ms(lambda: before_quantize_qkv(q, k, v, groups, q_mult), reps, inner, warmup)
    outs = [torch.empty(b, h, seq, d, dtype=torch.float8_e4m3fn, device=q.device) for _ in range(3)]
    row["copy_ms"] = timed_ms(lambda: [o.copy_(x) for o, x in zip(outs, (q, k, v))], reps, inner,
                             warmup)
    row["new_gbps"] = row["bytes"] / row["new_ms"] / 1e6
    row["copy_gbps"] = (3 * n * q.element_size() + 3 * n) / row["copy_ms"] / 1e6
    row["new_over_copy"] = row["new_ms"] / row["copy_ms"]
    row["speedup_vs_before"] = row["before_ms"] / row["new_ms"]
    if torch.cuda.is_available():
        row["new_kernels_us"] = kernel_us(lambda: quant.quantize_qkv(q, k, v, groups, q_mult))
    if sweep:
        row["sweep_ms"], row["sweep_differs"] = {}, {}
        ref = quant.quantize_qkv(q, k, v, groups, q_mult)
        for name, blocks in SWEEP.items():
            def call(blocks=blocks):
                outputs, launches = quant.plan_prepass(q, k, v, groups, q_mult, blocks)
                for launch in launches:
                    launch()
                return outputs
            q8, sq, k8, sk, vt8, sv = call()
            row["sweep_differs"][name] = differences(ref, quant.QuantizedQKV(q8, k8, vt8, sq, sk, sv, b, h))
            row["sweep_ms"][name] = timed_ms(call, reps, inner, warmup)
    log(f"{shape} {gran_name}: new {row['new_ms']:.3f} ms ({row['new_gbps']:.0f} GB/s, {row['new_over_copy']:.2f}× "
        f"copy), before {row['before_ms']:.3f} ms, copy {row['copy_ms']:.3f} ms; vs reference: "
        f"{row['new_vs_reference'] or 'identical'}; vs before: {row['new_vs_before'] or 'identical'}"
        + (f"; its kernels (µs): {row['new_kernels_us']}" if "new_kernels_us" in row else "")
        + (f"; sweep {row['sweep_ms']}" if sweep else ""))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| shape | granularity | groups (largest) | new ms | GB/s | new / copy | before ms | speedup | copy ms "
             "| copy GB/s | = reference | = before |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['granularity']} | {r['groups']} ({r['max_group']}) | {r['new_ms']:.3f} | "
                     f"{r['new_gbps']:.0f} | {r['new_over_copy']:.2f} | {r['before_ms']:.3f} | "
                     f"{r['speedup_vs_before']:.2f}× | {r['copy_ms']:.3f} | {r['copy_gbps']:.0f} | "
                     f"{'yes' if not r['new_vs_reference'] else 'NO: ' + ','.join(r['new_vs_reference'])} | "
                     f"{'yes' if not r['new_vs_before'] else 'NO: ' + ','.join(r['new_vs_before'])} |")
    if any("sweep_ms" in r for r in rows):
        names = list(SWEEP)
        lines += ["", "| shape | granularity | default ms | " + " | ".join(names) + " |",
                  "|" + "---|" * (3 + len(names))]
        for r in rows:
            cells = [f"{r['sweep_ms'][n]:.3f}" + ("" if not r["sweep_differs"][n] else " (DIFFERS)") for n in names]
            lines.append(f"| {r['shape']} | {r['granularity']} | {r['new_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ compile check
def specialization(launch: quant.Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of `launch` as the JIT specialises its arguments at a launch (ints
    of 1 become constants, pointers and ints divisible by 16 get that hint)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for i, (name, arg) in enumerate(zip(launch.kernel.arg_names, launch.args)):
        kind, key = native_specialize_impl(BaseBackend, arg, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = key
        elif key == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    meta = dict(launch.meta)
    options = {"num_warps": meta.pop("num_warps")}
    signature.update({name: "constexpr" for name in meta})
    constexprs.update(meta)
    return signature, constexprs, attrs, options


def compile_launch(launch: quant.Launch):
    """`launch` compiled for sm_90 (no GPU needed), specialised as a launch would be: the CompiledKernel (asm:
    ttgir, ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = specialization(launch)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def compile_checks(shapes=("480p", "720p"), granularities=tuple(GRANULARITIES)) -> list[dict]:
    """Compile every distinct launch of a call at each shape and granularity for sm_90 (meta tensors: no memory, no
    GPU) and check it: no spills, the hardware e4m3 cast where it quantizes, 16-byte loads. One dict per launch."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run the compile check without TRITON_INTERPRET"
    infos, seen = [], set()
    for shape in shapes:
        _, heads, grid = SHAPES[shape]
        layout = TokenLayout(grid, "tile", TILE)
        q, k, v = (torch.empty(1, layout.seq_len, heads, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
                   for _ in range(3))
        for gran_name in granularities:
            _, launches = quant.plan_prepass(q, k, v, quant_groups(layout, GRANULARITIES[gran_name], "cpu"), 0.5)
            for launch in launches:
                key = (launch.kernel.fn.__name__, repr(specialization(launch)))
                if key in seen:
                    continue
                seen.add(key)
                start = time.time()
                kernel = compile_launch(launch)
                ptx = kernel.asm["ptx"]
                info = dict(shape=shape, granularity=gran_name, kernel=launch.kernel.fn.__name__,
                            meta={n: x for n, x in launch.meta.items() if n != "FLOOR"},
                            num_warps=kernel.metadata.num_warps, shared=kernel.metadata.shared,
                            e4m3_cast="cvt.rn.satfinite.e4m3x2.f32" in ptx,
                            vector_loads=len(re.findall(r"ld\.global[.\w:]*\.v4\.b32", ptx)),
                            seconds=round(time.time() - start, 1), **ptxas_report(ptx))
                assert info["ptxas_rc"] == 0, info
                assert not info["spill_stores"] and not info["spill_loads"], f"ptxas spills: {info}"
                assert info["vector_loads"] > 0, f"no 16-byte loads: {info}"
                quantizes = launch.kernel is quant._second_kernel or not launch.meta["CHUNKED"]
                assert info["e4m3_cast"] == quantizes, f"hardware e4m3 cast: {info}"
                infos.append(info)
    return infos


# ---------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="prepass.json", help="JSON of the results (the table goes to stdout)")
    parser.add_argument("--shapes", default="480p,720p")
    parser.add_argument("--granularities", default=",".join(GRANULARITIES))
    parser.add_argument("--reps", type=int, default=20, help="timed samples per measurement (median)")
    parser.add_argument("--inner", type=int, default=5, help="back-to-back calls per sample")
    parser.add_argument("--sweep", action="store_true", help="also time quant.Blocks variants (SWEEP)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, interpreted, at a tiny shape (DRY_SHAPE): checks the script and the numerics")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every launch of --shapes and --granularities for sm_90 and check it")
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.compile_only:
        for info in compile_checks(args.shapes.split(","), args.granularities.split(",")):
            print(json.dumps(info), flush=True)
        return
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if args.dry_run:
        device, reps, inner, warmup = "cpu", 1, 1, 0
        name, heads, grid, tile, d = DRY_SHAPE
        cases = [(name, heads, TokenLayout(grid, "tile", tile), d)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --dry-run / --compile-only on the CPU)")
        device, reps, inner, warmup = "cuda", args.reps, args.inner, 3
        cases = [(s, SHAPES[s][1], TokenLayout(SHAPES[s][2], "tile", TILE), 128) for s in args.shapes.split(",")]
    rows = []
    for shape, heads, layout, d in cases:
        q, k, v = model_layout(1, heads, layout.seq_len, d, device, seed=0)
        for gran_name in args.granularities.split(","):
            rows.append(run_case(shape, gran_name, q, k, v, layout, reps, inner, warmup, args.sweep, log))
        del q, k, v
    header = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreted, dry run)'}, torch "
              f"{torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}, {started}")
    text = f"{header}\n\n{table(rows)}\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print(text)
    bad = [f"{r['shape']} {r['granularity']}" for r in rows if r["new_vs_reference"] or r["new_vs_before"]]
    if bad:
        raise SystemExit(f"outputs differ from the reference or the pre-pass before: {bad}")


if __name__ == "__main__":
    main()
