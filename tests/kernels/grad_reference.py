"""The reference's gradients and an error budget for the training kernel's deviation from them.

`reference_grads` runs the reference (fps/reference.py: the fake quantizers with their straight-through estimators,
then `softmax_pv` on the masked scores) block of query tiles by block, so it also runs at Wan's full shapes on a GPU;
its gradients are the reference's autograd (the row blocks are independent given the quantized Q, K, V, whose
scales are constants).

Budget (L2, per gradient). The kernel departs from the reference in known places (training.py): bf16 operands in
the backward's products (dO·s_v, P̂/ℓ, dS·s_k and dS·s_q), Δ summed from those rounded dP, and the bf16 gradients
it writes. `emulated` applies exactly those roundings to the
reference's formulas in PyTorch (round to nearest on the GPU, truncation as Triton's interpreter casts on the CPU);
the kernel makes the same roundings with its own accumulation order, so its error budget is twice
‖emulated − reference‖, plus what errors in the logits can do: the kernel recomputes S with its own accumulation
order (fp32: at most D·2^-24·Σ|q̂k̂|; Hopper's FP8 tensor cores about 2^-12·Σ|q̂k̂|) and base-2 FMAs (2^-21 of the
row's largest |s|): δ per row moves P by a factor within e^(±2δ), r = e^(2δ) − 1, carried through the gradient
formulas with absolute values; and P̂ may round one e4m3 step the other way where 448·p lies within r·448·p of a
rounding boundary. Summed with all signs aligned over the 32,760 keys of a 480p row, that worst case exceeds the
gradient itself on the GPU; the accumulation errors of different products are independent, so the term used is
the smaller of the worst case and 4× the root-sum-square of the per-key terms (what independent errors add up to,
with margin). On the CPU r is ~1e-6 and the worst case is the smaller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpsa_train.fps.fp8 import E4M3_MAX, quantize_qk, quantize_v, round_e4m3
from fpsa_train.fps.masks import token_ranges, token_tiles
from fpsa_train.fps.reference import softmax_pv

BF16 = torch.bfloat16
LOG2E = 1.4426950408889634


@dataclass
class GradReference:
    out: torch.Tensor  # (B, H, L, D) fp32
    grads: dict  # name → reference gradient: dq, dk, dv (B, H, L, D), dgate (B, H, N, N) when a gate is given
    budgets: dict  # name → L2 budget for ‖kernel − reference‖
    emulated: dict  # name → the reference's gradient with the kernel's roundings applied
    score_bounds: dict  # name → elementwise worst case of what logit errors can do
    parts: dict  # name → the budget's terms (L2): emulated roundings, logit errors worst case and root-sum-square

    def check(self, name: str, got: torch.Tensor, vacuity: float = 0.5) -> float:
        """Assert ‖got − ref‖ <= budget, and budget <= vacuity·‖ref‖ so that a zero or wrong gradient fails;
        returns err / budget."""
        ref, budget = self.grads[name], self.budgets[name]
        err = torch.linalg.vector_norm(got.float() - ref).item()
        scale = torch.linalg.vector_norm(ref).item()
        print(f"{name}: ‖kernel − ref‖ / ‖ref‖ = {err / scale:.4f}, budget / ‖ref‖ = {budget / scale:.4f}, terms "
              + ", ".join(f"{k} {v / scale:.4f}" for k, v in self.parts[name].items()))
        assert err <= budget, f"{name}: ‖kernel − reference‖ = {err:.4g} > budget {budget:.4g} (‖ref‖ {scale:.4g})"
        assert budget <= vacuity * scale, f"{name}: the budget {budget:.4g} is not small against ‖ref‖ {scale:.4g}"
        return err / budget


def _row_blocks(offsets: torch.Tensor, max_rows: int):
    """Runs of whole query tiles of at most max_rows tokens (one tile if it is larger)."""
    n, u = offsets.numel() - 1, 0
    while u < n:
        v = u + 1
        while v < n and int(offsets[v + 1] - offsets[u]) <= max_rows:
            v += 1
        yield u, v
        u = v


def _bf16_rne(x):
    return x.to(BF16).float()


def _bf16_truncate(x):
    """fp32 → bf16 by dropping the low 16 bits, as Triton's interpreter casts."""
    return (x.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def reference_grads(q, k, v, layout, regime, mask, dout, gate=None, max_rows: int = 4096) -> GradReference:
    """Reference output and gradients of (out · dout).sum(), and the kernel's error budgets (module docstring)."""
    _bf16 = _bf16_rne if q.is_cuda else _bf16_truncate
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    qh, sq = quantize_qk(q, layout, regime.quant, "q")  # (B, H, L, D), per-token scale (B, H, L, 1)
    kh, sk = quantize_qk(k, layout, regime.quant, "k")
    vh, sv = quantize_v(v)  # per-channel scale (B, H, 1, D)
    leaves = [x.detach().requires_grad_() for x in (qh, kh, vh)]
    ql, kl, vl = leaves
    gl = None if gate is None else gate.detach().clone().requires_grad_()
    b, h, seq, d = q.shape
    off = token_ranges(layout).to(q.device)
    n = off.numel() - 1
    tile_of = token_tiles(layout, q.device)
    keep = mask.to_dense().expand(b, h, -1, -1)
    dout = dout.float()
    eps = 2.0 ** -12 if q.is_cuda else d * 2.0 ** -24
    qd, kd, vd = (x.detach() for x in (qh, kh, vh))
    q8, k8, v8 = qd / sq, kd / sk, vd / sv  # the e4m3 values (exact)
    sq_kernel = sq * (LOG2E / math.sqrt(d))  # the kernel's query scale carries softmax scale · log2 e
    k_max = kd.abs().amax(dim=-2, keepdim=True)  # (B, H, 1, D)
    out = torch.empty(b, h, seq, d, device=q.device)
    emu = {name: torch.zeros(b, h, seq, d, device=q.device) for name in ("dq", "dk", "dv")}
    score = {name: torch.zeros(b, h, seq, d, device=q.device) for name in ("dq", "dk", "dv")}
    emu["dgate"] = torch.zeros(b, h, n, n, device=q.device)
    score["dgate"] = torch.zeros(b, h, n, n, device=q.device)
    rss = {name: torch.zeros_like(t) for name, t in score.items()}  # sums of squares
    for u0, u1 in _row_blocks(off.cpu(), max_rows):
        r0, r1 = int(off[u0]), int(off[u1])
        keep_tok = keep[:, :, tile_of[r0:r1]][..., tile_of]  # (B, H, R, L)
        s = (ql[:, :, r0:r1] @ kl.transpose(-1, -2)) * (1.0 / math.sqrt(d))
        s = s.masked_fill(~keep_tok, float("-inf"))
        g_tok = None if gl is None else gl[:, :, tile_of[r0:r1]][..., tile_of]
        o = softmax_pv(s, vl, g_tok, regime.quantized)  # (B, H, R, D)
        do = dout[:, :, r0:r1]
        o.backward(do)
        with torch.no_grad():
            out[:, :, r0:r1] = o
            s = s.detach()
            p = torch.exp(s - s.amax(-1, keepdim=True))
            ell = p.sum(-1, keepdim=True)
            pn = p / ell
            x = p * E4M3_MAX
            x_hat = round_e4m3(x)
            # the kernel's roundings, emulated
            dp_q = _bf16(do * sv) @ v8.transpose(-1, -2)  # dO·s_v in bf16
            delta_k = (x_hat / (E4M3_MAX * ell) * dp_q).sum(-1, keepdim=True)  # Δ from the same dP
            ds_q = pn * (dp_q - delta_k)
            emu["dq"][:, :, r0:r1] = (_bf16(ds_q * sk.transpose(-1, -2)) @ k8) / math.sqrt(d)
            emu["dk"] += (_bf16(ds_q * sq_kernel[:, :, r0:r1]).transpose(-1, -2) @ q8[:, :, r0:r1]) / LOG2E
            emu["dv"] += _bf16(x_hat / (E4M3_MAX * ell)).transpose(-1, -2) @ do
            # what logit errors can do (absolute values: a bound)
            delta_l = (eps * (qd[:, :, r0:r1].abs() * k_max).sum(-1, keepdim=True) / math.sqrt(d)
                       + 2.0 ** -21 * s.masked_fill(~keep_tok, 0).abs().amax(-1, keepdim=True))
            r = torch.expm1(2.0 * delta_l.clamp(max=30.0))  # (B, H, R, 1)
            dp = do @ vd.transpose(-1, -2)
            delta = (do * o).sum(-1, keepdim=True)
            e_ds = r * pn * (dp - delta).abs()
            score["dq"][:, :, r0:r1] = (e_ds @ kd.abs()) / math.sqrt(d)
            score["dk"] += (e_ds.transpose(-1, -2) @ qd[:, :, r0:r1].abs()) / math.sqrt(d)
            rss["dq"][:, :, r0:r1] = (e_ds.square() @ kd.square()) / d
            rss["dk"] += (e_ds.square().transpose(-1, -2) @ qd[:, :, r0:r1].square()) / d
            step = torch.exp2(torch.floor(torch.log2(x)).clamp(min=-6.0) - 3.0)
            flip = ((step / 2 - (x - x_hat).abs()) <= 1.5 * r * x) & keep_tok
            e_pn = (torch.where(flip, step, 0.0) + r * x_hat) / (E4M3_MAX * ell)
            score["dv"] += e_pn.transpose(-1, -2) @ do.abs()
            rss["dv"] += e_pn.square().transpose(-1, -2) @ do.square()
            if gl is not None:  # sums over each (query tile, key tile) pair
                rows = tile_of[r0:r1] - u0
                for acc, t in ((emu, ds_q), (score, e_ds), (rss, e_ds.square())):
                    by_key = torch.zeros(b, h, r1 - r0, n, device=q.device).index_add_(-1, tile_of, t)
                    acc["dgate"][:, :, u0:u1] += torch.zeros(b, h, u1 - u0, n, device=q.device).index_add_(
                        -2, rows, by_key)
    torch.autograd.backward([qh, kh, vh], [leaf.grad for leaf in leaves])  # the fake quantizers' estimators
    grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
    if gl is not None:
        grads["dgate"] = gl.grad
    else:
        del emu["dgate"], score["dgate"], rss["dgate"]
    budgets, parts = {}, {}
    for name, g in grads.items():
        if name != "dgate":
            emu[name] = _bf16(emu[name])  # the kernel writes bf16 gradients (fp32 for the gate)
        norm = torch.linalg.vector_norm
        parts[name] = {"emulated": norm(emu[name] - g).item(), "logits_worst": norm(score[name]).item(),
                       "logits_rss": norm(rss[name].sqrt()).item()}
        logits = min(parts[name]["logits_worst"], 4.0 * parts[name]["logits_rss"])
        budgets[name] = 2.0 * parts[name]["emulated"] + logits + 1e-6 * g.abs().max().item()
    return GradReference(out, grads, budgets, emu, score, parts)
