"""Ulysses sequence parallelism: two CPU processes over gloo compute what one process computes.

The acceptance test is equivalence. A tiny WanModel (4 heads, 2 layers, activation checkpointing on, tile-major
tokens) runs one training step on the 2 ranks of one sequence-parallel group and in a single process with the same
weights and batch: the output on every rank must equal the single-process output, and each parameter's gradient
summed over the ranks (each rank holds the partial sum over its tokens) must equal the single-process gradient.
Cases: FPS attention (reference backend) with a schedule of dense FP8, window, window ∪ top-k and learned-selector
regimes, one sample in each, applied before and after sequence parallelism; and plain dense SDPA.

Tolerances, derived. The collectives only move data; what differs is rounding, and each SQNR of SP against one
process (the output; each parameter's gradient) must clear the lower of two floors:
- Reordering. Kernels whose summation order depends on how many rows or heads they get (matmuls over L/sp tokens,
  batched ops over H/sp heads), and the order in which a weight gradient's n = B·L = 1080 token rows are summed
  (each rank its L/sp, then the ranks add). Output: 100 dB, the whole-model fp32 parity bound (relative 1e-5,
  tests/models/test_wan_parity.py). Gradients: two orders of an n-term fp32 sum differ by up to
  γ_n·Σ|terms| (γ_n = n·2^-24 = 6.4e-5, 84 dB): 80 dB, where |Σ terms| ≈ Σ|terms|. A learned selector's bias
  gradient Σ_{b,u,v} G·s' cancels heavily (per query tile the gate gradients G sum to zero, by softmax
  normalisation), so its floor drops by 20·log10 κ, κ = ‖Σ|G|·s'‖ / ‖Σ G·s'‖ measured on the single process by
  `record_selector_cancellation` (κ ≈ 44–52 here: floors ≈ 46 dB).
- Sensitivity to an ulp. The single process again with its input moved by one ulp (`perturb`), less MARGIN_DB =
  10 dB (3× in amplitude). This covers FP8: an ulp that pushes a q/k/v value across an e4m3 rounding boundary
  flips that rounding, a whole e4m3 step. We count flips (`record_fp8_codes`): 0 of 414,720 under SP, 5 in the
  perturbed run, whose output is then 96 dB away (floor 86 dB) and its second block's gradients 67–75 dB.
Measured, SP against one process: on the dev CPU (torch 2.13) dense SDPA bit-identical, FPS output 147 dB
(max |Δ| 1.2e-6), gradients ≥ 114 dB; on the GPU host's Xeon (torch 2.11) FPS output 125 dB, gradients ≥ 94 dB
except the second block's selector bias, 68 dB (floor ≈ 46 dB).
"""

from __future__ import annotations

import dataclasses
import math
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fpsa_train.fps.fp8 import qk_scales, round_e4m3, sqnr_db, v_scales
from fpsa_train.fps.masks import LearnedSelector
from fpsa_train.fps.schedule import FPSConfig, QuantConfig, RegimeConfig, Schedule, SparsityConfig
from fpsa_train.fps.transform import apply_fps_attention, fps_cores
from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel
from fpsa_train.sequence_parallel import SPGroups, apply_sequence_parallel, dp_coordinates, init_sp_groups

CFG = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=16, freq_dim=16, text_len=8,
                token_order="tile", tile_shape=[2, 4, 4], activation_checkpointing=True)
LATENT = (4, 16, 5, 12, 18)  # (B, C, F, H, W): token grid 5×6×9 = 270 tokens, 3×2×3 tiles (partial edges)
SIGMA = (0.1, 0.35, 0.6, 0.9)  # one sample in each regime of `schedule()`
WORLD = 2
CASES = ("fps", "fps_sp_first", "dense")
FWD_FLOOR_DB = 100.0
GRAD_FLOOR_DB = 80.0
MARGIN_DB = 10.0


def schedule(tile_shape=(2, 4, 4)) -> Schedule:
    return Schedule.from_config(FPSConfig(regimes=[
        RegimeConfig("dense_fp8", [0.0, 0.25], QuantConfig("subtile", [1, 2, 2]), SparsityConfig("dense")),
        RegimeConfig("window", [0.25, 0.5], QuantConfig("tiles", [2, 2, 2]), SparsityConfig("window", [1, 1, 3])),
        RegimeConfig("window_topk", [0.5, 0.75], QuantConfig("tile"), SparsityConfig("window_topk", [1, 1, 1], 2)),
        RegimeConfig("learned", [0.75, 1.0], QuantConfig("tile"),
                     SparsityConfig("learned", [1, 1, 1], target_density=0.4)),
    ]), tuple(tile_shape))


def build(case: str, cfg: WanConfig = CFG, groups: SPGroups | None = None, backend: str = "reference",
          device: str = "cpu") -> WanModel:
    """The same weights in every process (seeded, built on the CPU); sequence parallel when `groups` is given."""
    torch.manual_seed(0)
    model = WanModel(cfg).train()
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.1)  # the published init zeroes the output layer
    if groups is not None and case == "fps_sp_first":
        apply_sequence_parallel(model, groups)
    if case != "dense":
        apply_fps_attention(model, schedule(cfg.tile_shape), backend=backend)
        g = torch.Generator().manual_seed(1)
        for core in fps_cores(model):
            core.collect_stats = True
            bias = core.selectors["learned"].bias
            with torch.no_grad():  # a different threshold per head: a rank using other heads' entries would show
                bias.add_(torch.randn(bias.shape, generator=g))
    if groups is not None and case != "fps_sp_first":
        apply_sequence_parallel(model, groups)
    return model.to(device)


def batch(cfg: WanConfig = CFG, latent=LATENT, device: str = "cpu"):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*latent, generator=g)
    context = torch.randn(latent[0], 5, cfg.text_dim, generator=g)
    sigma = torch.tensor(SIGMA[:latent[0]], dtype=torch.float32)
    weight = torch.randn(x.shape, generator=g)  # loss = mean(out · weight): every output element matters
    return tuple(t.to(device) for t in (x, context, sigma, weight))


def record_fp8_codes(model: WanModel, codes: dict) -> list:
    """Hooks filling codes[layer] with the e4m3 values (3, B, H, L, D) of each FPS core's q, k, v (zeros for
    unquantized samples), from the layer's first call (activation checkpointing calls it again)."""

    @torch.no_grad()
    def hook(core, args, kwargs):
        if core.layer in codes:
            return
        q, k, v, layout = args
        sigma = torch.as_tensor(kwargs["sigma"]).reshape(-1).expand(q.shape[0])
        out = torch.zeros(3, *q.shape)
        for b, r in enumerate(core.schedule.regime_index(sigma).tolist()):
            quant = core.schedule.regimes[r].quant
            if quant is not None:
                qb, kb, vb = (x[b:b + 1].float() for x in (q, k, v))
                for i, (x, scale) in enumerate([(qb, qk_scales(qb, layout, quant)), (kb, qk_scales(kb, layout, quant)),
                                                (vb, v_scales(vb))]):
                    out[i, b] = round_e4m3(x / scale)[0].cpu()
        codes[core.layer] = out

    return [c.register_forward_pre_hook(hook, with_kwargs=True) for c in fps_cores(model)]


def record_selector_cancellation(model: WanModel, kappa: dict) -> list:
    """Hooks filling kappa[bias name] with ‖Σ|G|·s'‖ / ‖Σ G·s'‖ (norms over heads), how much the bias gradient
    Σ_{b,u,v} G·s' cancels: G = ∂loss/∂gate per tile pair, s' = ∂gate/∂bias = σ'(z)/T > 0."""
    names = {m: f"{n}.bias" for n, m in model.named_modules() if isinstance(m, LearnedSelector)}

    def forward_hook(selector, args, out):
        gate = out[1]

        def on_grad(g):
            handle.remove()  # the autograd.grad calls below would fire it again
            signed, = torch.autograd.grad(gate, selector.bias, g, retain_graph=True)
            absolute, = torch.autograd.grad(gate, selector.bias, g.abs(), retain_graph=True)
            kappa[names[selector]] = float(absolute.norm() / signed.norm())

        if gate.requires_grad:
            handle = gate.register_hook(on_grad)

    return [m.register_forward_hook(forward_hook) for m in names]


def step(model: WanModel, x, context, sigma, weight, autocast: torch.dtype | None = None) -> dict:
    """One forward and backward; what the comparison needs, on the CPU."""
    model.zero_grad()
    codes: dict = {}
    kappa: dict = {}
    handles = record_fp8_codes(model, codes) + record_selector_cancellation(model, kappa)
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = model(x, sigma * 1000, context, attn_kwargs={"sigma": sigma})
    (out.float() * weight).mean().backward()
    for h in handles:
        h.remove()
    cores = fps_cores(model)
    return {"out": out.detach().float().cpu(),
            "grads": {n: p.grad.detach().float().cpu() for n, p in model.named_parameters() if p.grad is not None},
            "density": [dict(c.last_density) for c in cores],
            "aux": [float(c.aux_loss.detach()) for c in cores if c.aux_loss is not None],
            "fp8_stats": [dict(c.last_fp8_stats) for c in cores],
            "backend": [c.last_backend for c in cores],
            "codes": [codes[i] for i in sorted(codes)],
            "kappa": kappa}


def _worker(rank: int, world: int, folder: str, cases: tuple[str, ...], device: str, autocast, cfg, latent) -> None:
    """One rank: every case with SP over all `world` ranks; results saved to folder/rank{rank}.pt."""
    torch.set_num_threads(1)  # two ranks share the two cores
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", init_method=f"file://{folder}/store",
                            rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        groups = init_sp_groups(world)
        backend = "auto" if device.startswith("cuda") else "reference"
        results = {case: step(build(case, cfg, groups, backend, device), *batch(cfg, latent, device), autocast)
                   for case in cases}
        torch.save(results, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_sp(folder: Path, cases: tuple[str, ...] = CASES, device: str = "cpu", autocast=None, cfg=CFG,
             latent=LATENT, world: int = WORLD):
    """Start `world` ranks (one sequence-parallel group) in the background; `collect` their results."""
    return mp.start_processes(_worker, args=(world, str(folder), cases, device, autocast, cfg, latent),
                              nprocs=world, start_method="spawn", join=False)


def collect(processes, folder: Path) -> list[dict]:
    """Wait for the ranks (a failure re-raises the rank's traceback) and load each rank's results."""
    while not processes.join():
        pass
    return [torch.load(folder / f"rank{r}.pt") for r in range(len(processes.processes))]


def fp8_flips(ranks: list[dict], single: dict) -> tuple[int, int]:
    """(e4m3 roundings of q, k, v that differ, quantized elements) between SP (heads concatenated) and one process."""
    flips = total = 0
    for layer, ref in enumerate(single["codes"]):
        sp = torch.cat([r["codes"][layer] for r in ranks], dim=2)  # (3, B, H, L, D): rank r holds head group r
        quantized = ref.flatten(2).ne(0).any(-1)  # (3, B): samples that ran a quantized regime
        flips += int((sp != ref).sum())
        total += int(quantized.sum()) * ref[0, 0].numel()
    return flips, total


def sqnr_report(ranks: list[dict], single: dict) -> dict[str, float]:
    """SQNR in dB against one process: of the output (the worse rank) and of each parameter's rank-summed gradient."""
    result = {"out": min(sqnr_db(single["out"], r["out"]) for r in ranks)}
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, g in single["grads"].items():
        result[name] = sqnr_db(g, sum(r["grads"][name] for r in ranks))
    return result


def floors(single: dict, perturbed: dict) -> dict[str, float]:
    """Per output/parameter, the lower of two floors (module docstring): reordering (100 dB output, 80 dB gradients,
    less 20·log10 κ for a selector bias) and the input-ulp sensitivity (perturbed run's SQNR − MARGIN_DB)."""
    measured = sqnr_report([perturbed], single)
    reorder = {name: FWD_FLOOR_DB if name == "out" else GRAD_FLOOR_DB - 20 * math.log10(single["kappa"].get(name, 1.0))
               for name in measured}
    return {name: min(reorder[name], db - MARGIN_DB) for name, db in measured.items()}


def perturb(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x moved by about one ulp of `dtype` (the compute dtype: autocast's, or fp32)."""
    return x * (1 + torch.finfo(dtype).eps)


def check(ranks: list[dict], single: dict, perturbed: dict) -> str:
    """Assert every SQNR of SP against one process is above its floor; return a one-line summary."""
    db, floor = sqnr_report(ranks, single), floors(single, perturbed)
    flips, total = fp8_flips(ranks, single)
    pert_flips, _ = fp8_flips([perturbed], single)
    margin = min(db, key=lambda n: db[n] - floor[n])
    summary = (f"output {db['out']:.0f} dB (floor {floor['out']:.0f}); closest to its floor: {margin} "
               f"{db[margin]:.0f} dB (floor {floor[margin]:.0f}); e4m3 flips {flips}/{total} (perturbed input: "
               f"{pert_flips})")
    bad = {n: (round(db[n], 1), round(floor[n], 1)) for n in db if db[n] < floor[n]}
    assert not bad, f"{summary}; below the floor (dB, floor): {bad}"
    return summary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(per-rank results, single-process results, single-process results with the input perturbed, seconds)."""
    folder = tmp_path_factory.mktemp("sp")
    start = time.perf_counter()
    processes = spawn_sp(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the two ranks on two cores
    try:  # while the ranks start
        x, context, sigma, weight = batch()
        single = {case: step(build(case), x, context, sigma, weight) for case in CASES}
        perturbed = {case: step(build(case), perturb(x), context, sigma, weight) for case in CASES}
    finally:
        torch.set_num_threads(threads)
    ranks = collect(processes, folder)
    return ranks, single, perturbed, time.perf_counter() - start


@pytest.mark.parametrize("case", CASES)
def test_sp_forward_and_gradients_equal_one_process(runs, case):
    ranks, single, perturbed, seconds = runs
    summary = check([r[case] for r in ranks], single[case], perturbed[case])
    print(f"\n{case} (SP and single runs {seconds:.1f} s): {summary}")


def test_sp_before_or_after_fps_is_the_same(runs):
    ranks = runs[0]
    for result in ranks:
        assert torch.equal(result["fps"]["out"], result["fps_sp_first"]["out"])
        assert all(torch.equal(g, result["fps_sp_first"]["grads"][n]) for n, g in result["fps"]["grads"].items())


def test_fps_statistics_under_sp(runs):
    """Each rank reports its own heads: the mean density over the ranks is the single-process density (every rank
    holds as many heads); the selector regulariser summed over the ranks is the mean over head groups of
    (density − ρ)², never below the single-process value; FP8 statistics are recorded and nothing saturates."""
    ranks, single = runs[:2]
    ref = single["fps"]
    for layer, density in enumerate(ref["density"]):
        assert set(density) == {"dense_fp8", "window", "window_topk", "learned"}
        for regime, value in density.items():
            per_rank = [r["fps"]["density"][layer][regime] for r in ranks]
            assert abs(sum(per_rank) / WORLD - value) < 1e-6, (layer, regime, per_rank, value)
    for layer, aux in enumerate(ref["aux"]):
        summed = sum(r["fps"]["aux"][layer] for r in ranks)
        assert summed >= aux * (1 - 1e-6), (layer, summed, aux)
    for result in (*ranks, single):
        stats = result["fps"]["fp8_stats"]
        assert len(stats) == CFG.num_layers and all(s["saturated"] == 0 and 0 <= s["underflow"] < 1 for s in stats)


# ---------------------------------------------------------------- single process: conventions and errors


def test_dp_coordinates_convention():
    assert [dp_coordinates(r, 8, 4) for r in range(8)] == [(0, 2, 0), (0, 2, 1), (0, 2, 2), (0, 2, 3),
                                                           (1, 2, 0), (1, 2, 1), (1, 2, 2), (1, 2, 3)]
    assert dp_coordinates(5, 6, 1) == (5, 6, 0)
    with pytest.raises(ValueError, match="trainer.sp_size=4"):
        dp_coordinates(0, 6, 4)


def fake_groups(size: int = 2, rank: int = 0) -> SPGroups:
    return SPGroups(None, size, rank, 1, 0)  # errors are raised before any collective


def test_indivisible_heads_and_tokens_are_errors():
    with pytest.raises(ValueError, match=r"trainer.sp_size=3 must divide model.num_heads=4"):
        apply_sequence_parallel(WanModel(CFG), fake_groups(3))
    model = apply_sequence_parallel(WanModel(CFG), fake_groups(2))
    x = torch.randn(1, 16, 3, 6, 10)  # token grid 3×3×5 = 45 tokens
    with pytest.raises(ValueError, match=r"trainer.sp_size=2 must divide the token count 45"):
        model(x, torch.tensor([500.0]), torch.randn(1, 5, CFG.text_dim))
    with pytest.raises(ValueError, match="already"):
        apply_sequence_parallel(model, fake_groups(2))


def test_state_dict_keys_unchanged_in_either_order():
    plain = list(apply_fps_attention(WanModel(CFG), schedule()).state_dict())
    before = apply_fps_attention(apply_sequence_parallel(WanModel(CFG), fake_groups()), schedule())
    after = apply_sequence_parallel(apply_fps_attention(WanModel(CFG), schedule()), fake_groups())
    assert list(before.state_dict()) == plain == list(after.state_dict())
    assert list(apply_sequence_parallel(WanModel(CFG), fake_groups()).state_dict()) == list(WanModel(CFG).state_dict())


def test_group_of_one_leaves_the_model_alone():
    model = WanModel(CFG)
    assert apply_sequence_parallel(model, SPGroups(None, 1, 0, 4, 2)) is model and model.sequence_parallel is None


def test_init_needs_torch_distributed():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    with pytest.raises(RuntimeError, match="trainer.sp_size=2"):
        init_sp_groups(2)


def test_sp_model_can_be_deep_copied():
    import copy

    model = apply_sequence_parallel(WanModel(dataclasses.replace(CFG, num_layers=1)), fake_groups())
    copied = copy.deepcopy(model)
    assert copied.sequence_parallel is model.sequence_parallel
    assert copied.blocks[0].self_attn.sequence_parallel is model.sequence_parallel


def test_training_with_sp_2_follows_the_single_process_curve(tmp_path):
    """`python -m fpsa_train trainer.sp_size=2` on two gloo ranks (one sequence-parallel group, data-parallel
    size 1) trains like one process: both ranks draw the same σ and noise (seeded by data-parallel rank), read
    the same batches, and the loss ×sp_size before DDP's average gives the full gradient, so the losses agree
    step for step up to fp32 reduction order. (Adam's step barely depends on the gradient's scale, so this checks
    the shared draws, batches and gathered gradients more than the ×sp_size; the gradients themselves are compared
    with the single rank's above.)"""
    from tests.test_resume import finish, launch, losses

    common = ["trainer.max_steps=6", "optim.ema_decay=0", "fps=dense"]
    finish(launch(tmp_path / "one", [*common, "trainer.devices=1"]))
    finish(launch(tmp_path / "sp", [*common, "trainer.devices=2", "trainer.strategy=ddp", "trainer.sp_size=2"]))
    one, sp = losses(tmp_path / "one"), losses(tmp_path / "sp")
    assert sorted(one) == sorted(sp) == list(range(6))
    for step in one:
        assert abs(sp[step] - one[step]) <= 1e-4 * abs(one[step]), (step, sp[step], one[step])
