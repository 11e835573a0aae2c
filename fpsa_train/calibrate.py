"""Calibrate a step-aware schedule: the most aggressive regime per noise level within an error budget.

`python -m fpsa_train.calibrate [model=...] [checkpoint=run/checkpoints/last.ckpt] [budget_db=25] [output=...]`
`python -m fpsa_train.calibrate candidates=topk metric=output model.weights=<QAT weights> \
    reference_weights=<dense weights> budget_db=...` (weights: e.g. a deploy's diffusion_pytorch_model.safetensors)

1. Build the model (random, `model.weights` Wan weights, e.g. an exported deploy's safetensors, or `checkpoint=` a
   training checkpoint, its EMA by default: `weights=auto|ema|live`) and take `samples` clips of the configured
   data.
2. For every σ on the grid: noise the clips to x_σ, run the model once with dense attention and capture each
   layer's self-attention q, k, v (the tokens already tile-major).
3. For every candidate regime (each quantization granularity × each sparsity pattern; `candidates=topk` for FP8
   with top-k shares) its error in dB, by `metric`:
   - `attention`: each layer's attention output as SQNR against dense bf16 attention (SDPA on bf16 q, k, v), the
     worst layer counting. What the numerics cost one attention call; blind to what training taught the model.
   - `output`: the model's prediction (velocity) with the candidate in every layer, as SQNR against the dense
     prediction of `reference_weights` (default: the same weights) for the same x_σ. After QAT this is the one
     to use: a fine-tune does not make attention more exact, it makes the model tolerate the error, which only the
     prediction shows; with the dense model as reference the budget also counts what the fine-tune moved.
4. Per σ keep the cheapest candidate whose SQNR stays within the budget. Cost = realised density × (½ if FP8):
   FP8 tensor cores double the matmul rate and sparsity skips the dropped tile pairs; at equal cost the coarsest
   quantization wins. A σ where no candidate is within budget gets plain dense attention without quantization.
5. Neighbouring σ with the same choice merge into one regime (boundaries half-way between grid points); the
   schedule is validated and written as YAML with `regimes:`, which `fps.schedule_file=...` accepts; its header
   gives the table and the schedule's mean density over Wan's 50 sampling steps (flow UniPC, shift 5).

It also reports the SQNR of the regimes of the configured schedule (`fps`) at the σ they own.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from fpsa_train.atomic import write_text_atomic
from fpsa_train.config import DataConfig, ModelConfig, resolve
from fpsa_train.deprecation import renamed_key
from fpsa_train.flow import noisy_input, sampling_sigmas
from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.fps.reference import attention_tiles
from fpsa_train.fps.schedule import (FPSConfig, QuantConfig, RegimeConfig, Schedule, SparsityConfig,
                                     regime_config, regime_from_config)
from fpsa_train.fps.transform import FPSAttention
from fpsa_train.lit.config import WEIGHT_CHOICES, weight_choice
from fpsa_train.lit.datamodule import validation_batch
from fpsa_train.lit.training_checkpoint import pick_weights, read_training_checkpoint
from fpsa_train.models.attention import SDPAttention
from fpsa_train.models.build import build_model

log = logging.getLogger(__name__)


@dataclass
class CalibrateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fps: FPSConfig = field(default_factory=FPSConfig)
    """The schedule to report on (and the defaults the candidates are compared with)."""
    checkpoint: Optional[str] = None
    """A training checkpoint whose weights to calibrate (a Lightning .ckpt file, a DeepSpeed ZeRO checkpoint folder
    or a consolidated file); null = `model.weights` or random."""
    weights: Optional[str] = "auto"
    """Which weights of `checkpoint`: `auto` (the EMA when it has one, else the live weights), `ema` or `live`.
    Deprecated spellings, accepted with a warning: `model` (= live) and a path (the old `weights=<checkpoint>`,
    now `checkpoint=`); null is the old default and means auto."""
    use_ema: Optional[bool] = None
    """Deprecated: `weights=auto` (true) or `weights=live` (false)."""
    sigmas: list[float] = field(default_factory=lambda: [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95])
    """The σ grid (ascending, in (0, 1))."""
    samples: int = 4
    """Clips per σ."""
    budget_db: float = 25.0
    """Minimum SQNR (dB; `metric` says of what) every σ must keep."""
    max_density: Optional[float] = None
    """Instead of `budget_db`: the highest budget whose schedule averages at most this density over Wan's 50
    sampling steps (e.g. 0.3), i.e. the given speed at the best worst-σ quality the candidates allow."""
    metric: str = "attention"
    """`attention` (each layer's attention output, worst layer) or `output` (the model's prediction; see above)."""
    reference_weights: Optional[str] = None
    """metric=output: the dense model whose prediction is the reference (Wan weights, e.g. the dense deploy's
    safetensors); null = the calibrated weights themselves with dense attention."""
    reference_checkpoint: Optional[str] = None
    """Deprecated: the old name of `reference_weights`."""
    quant: list[Optional[QuantConfig]] = field(default_factory=lambda: [
        None, QuantConfig("token"), QuantConfig("subtile", [2, 2, 2]), QuantConfig("tile"),
        QuantConfig("tiles", [2, 2, 2])])
    """Candidate Q/K granularities (null = no quantization)."""
    sparsity: list[SparsityConfig] = field(default_factory=lambda: [
        SparsityConfig("dense"), SparsityConfig("window_topk", [6, 6, 3], 4), SparsityConfig("window", [6, 6, 3]),
        SparsityConfig("window", [6, 6, 1]), SparsityConfig("window", [3, 3, 1])])
    """Candidate sparsity patterns."""
    output: str = MISSING
    """Where to write the calibrated schedule (YAML)."""
    seed: int = 0
    """Seed of the noise."""

    def __post_init__(self) -> None:
        """The deprecated spellings (fpsa_train/deprecation.py) mapped to the current ones, each with a warning."""
        if self.weights is None:  # the old default: no training checkpoint
            self.weights = "auto"
        if self.weights not in (*WEIGHT_CHOICES, "model"):  # the old `weights=<training checkpoint>`
            self.checkpoint = renamed_key("weights", self.weights, "checkpoint", self.weights, self.checkpoint,
                                          self.checkpoint is not None)
            self.weights = "auto"
        self.weights = weight_choice(self.weights, "weights")
        if self.use_ema is not None:
            self.weights = renamed_key("use_ema", self.use_ema, "weights", "auto" if self.use_ema else "live",
                                       self.weights, self.weights != "auto")
            self.use_ema = None
        if self.reference_checkpoint is not None:
            self.reference_weights = renamed_key("reference_checkpoint", self.reference_checkpoint,
                                                 "reference_weights", self.reference_checkpoint,
                                                 self.reference_weights, self.reference_weights is not None)
            self.reference_checkpoint = None


ConfigStore.instance().store(name="calibrate_schema", node=CalibrateConfig)

# Among candidates of equal cost the coarsest quantization is the most aggressive (fewest scales to compute).
COARSENESS = {"tiles": 0, "tile": 1, "subtile": 2, "token": 3, None: 4}


def load_weights(model: torch.nn.Module, path: str, weights: str = "auto") -> str:
    """Weights from a training checkpoint (lit/training_checkpoint.py: a Lightning file, a DeepSpeed ZeRO folder or
    a consolidated file), as `weights` (auto, ema or live) picks them; FPS-core parameters are not needed. Returns
    which weights were loaded: "ema" or "live"."""
    state, which = pick_weights(read_training_checkpoint(path), weights)
    state = {k: v for k, v in state.items() if ".self_attn.core." not in k}  # learned selectors
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path} does not fit the model: missing {missing[:20]}, unexpected {unexpected[:20]}")
    return which


class _Capture(SDPAttention):
    """Dense attention that records its inputs."""

    def __init__(self):
        super().__init__()
        self.qkv = None

    def forward(self, q, k, v, layout, **attn_kwargs):
        self.qkv = (q.detach(), k.detach(), v.detach(), layout)
        return super().forward(q, k, v, layout)


@contextmanager
def _cores(model, cores: list):
    """Within the block, each block's self-attention core is `cores[i]`; the model's own are back on exit."""
    saved = [b.self_attn.core for b in model.blocks]
    for block, core in zip(model.blocks, cores):
        block.self_attn.core = core
    try:
        yield
    finally:
        for block, core in zip(model.blocks, saved):
            block.self_attn.core = core


def _noised(batch: dict, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_σ, timestep, σ per clip) for the batch's clips noised to σ with the seed's noise."""
    x0 = batch["latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    s = torch.full((x0.shape[0],), sigma)
    return noisy_input(x0, noise, s)[0], s * 1000, s


@torch.no_grad()
def capture_qkv(model, batch: dict, sigma: float, seed: int) -> list[tuple]:
    """Each layer's (q, k, v, layout) for the batch noised to σ (dense attention everywhere)."""
    cores = [_Capture() for _ in model.blocks]
    x, t, _ = _noised(batch, sigma, seed)
    with _cores(model, cores):
        model(x, t, batch["context"])
    return [c.qkv for c in cores]


@torch.no_grad()
def regime_sqnr(layers: list[tuple], regime) -> tuple[float, float]:
    """(worst-layer SQNR in dB against dense bf16 attention, mean realised density) of a regime."""
    worst, densities = math.inf, []
    for q, k, v, layout in layers:
        ref = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
        out, sel = attention_tiles(q, k, v, layout, regime)
        worst = min(worst, sqnr_db(ref, out))
        densities.append(float(sel.mask.density().mean()))
    return worst, sum(densities) / len(densities)


def candidate_name(quant: QuantConfig | None, sp: SparsityConfig) -> str:
    """Unique, readable: e.g. `subtile222-w663+top4`, `noquant-dense`."""
    q = "noquant" if quant is None else quant.group + ("".join(map(str, quant.factor))
                                                       if quant.group in ("tiles", "subtile") else "")
    parts = [f"w{''.join(map(str, sp.window))}"] if sp.window and sp.pattern != "dense" else []
    if sp.pattern in ("topk", "window_topk"):
        parts += [f"top{sp.topk}" if sp.topk is not None else f"top{100 * sp.topk_fraction:g}%"]
    parts += [f"learned{sp.target_density}"] if sp.pattern == "learned" else []
    return f"{q}-{'+'.join(parts) or 'dense'}"


def candidates(cfg: CalibrateConfig, tile_shape) -> list:
    out = []
    for quant in cfg.quant:
        for sp in cfg.sparsity:
            name = candidate_name(quant, sp)
            out.append(regime_from_config(RegimeConfig(name, [0.0, 1.0], quant, sp), "calibrate candidate",
                                          tuple(tile_shape)))
    return out


class _OutputError:
    """metric=output: the model's prediction with one regime in every layer vs the reference's dense prediction."""

    def __init__(self, model, cfg: CalibrateConfig, schedule: Schedule):
        self.model, self.reference = model, model
        if cfg.reference_weights:
            self.reference = build_model(dataclasses.replace(cfg.model, weights=cfg.reference_weights)).eval()
        self.fps_cores = [FPSAttention(schedule, b.self_attn.num_heads, i)
                          for i, b in enumerate(model.blocks)]  # each call forces one regime (below)

    @torch.no_grad()
    def prepare(self, batch: dict, sigma: float, seed: int) -> None:
        x, t, s = _noised(batch, sigma, seed)
        self.inputs = (x, t, batch["context"], s)
        self.target = self.reference(x, t, batch["context"]).float()

    @torch.no_grad()
    def __call__(self, regime) -> tuple[float, float]:
        x, t, context, s = self.inputs
        forced = Schedule((dataclasses.replace(regime, lo=0.0, hi=1.0),))
        for core in self.fps_cores:
            core.schedule = forced
        with _cores(self.model, self.fps_cores):
            out = self.model(x, t, context, attn_kwargs={"sigma": s}).float()
        densities = [d for c in self.fps_cores for d in c.last_density.values()]
        return sqnr_db(self.target, out), sum(densities) / len(densities)


def calibrate(cfg: CalibrateConfig) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.metric not in ("attention", "output"):
        raise ValueError(f"metric={cfg.metric!r}: expected attention or output")
    model = build_model(cfg.model).eval()
    if cfg.checkpoint:
        log.info("checkpoint: %s (%s weights)", cfg.checkpoint, load_weights(model, cfg.checkpoint, cfg.weights))
    batch = validation_batch(cfg.data, cfg.model.text_len, cfg.samples)
    cands = candidates(cfg, cfg.model.tile_shape)
    if len({c.name for c in cands}) != len(cands):
        raise ValueError(f"calibration candidates repeat: {[c.name for c in cands]}")
    exact = regime_from_config(RegimeConfig("noquant-dense", [0.0, 1.0]), "fallback", tuple(cfg.model.tile_shape))
    measured = cands if any(c.name == exact.name for c in cands) else [*cands, exact]  # the fallback is measured
    current = Schedule.from_config(cfg.fps, tuple(cfg.model.tile_shape))
    output = _OutputError(model, cfg, current) if cfg.metric == "output" else None

    table, current_report = {}, []
    for i, sigma in enumerate(sorted(cfg.sigmas)):
        if output is not None:
            output.prepare(batch, sigma, cfg.seed + i)
            error = output
        else:
            layers = capture_qkv(model, batch, sigma, cfg.seed + i)
            error = lambda regime: regime_sqnr(layers, regime)  # noqa: E731
        table[sigma] = {c.name: error(c) for c in measured}
        mine = current.regime_for(sigma)
        current_report.append((sigma, mine.name, *error(mine)))
    budget = cfg.budget_db if cfg.max_density is None else budget_for_density(table, cands, measured,
                                                                               cfg.max_density)
    chosen = choose(table, cands, measured, budget)
    for (sigma, row), best, mine in zip(table.items(), chosen, current_report):
        log.info("σ=%.2f  chose %-22s SQNR %.1f dB density %.2f | configured %s: %.1f dB density %.2f", sigma,
                 best.name, *row[best.name], *mine[1:])
    schedule = merge(sorted(cfg.sigmas), chosen, tuple(cfg.model.tile_shape))
    density = sampling_density(table, chosen)
    write_schedule(schedule, cfg, table, Path(cfg.output), density, budget)
    return {"schedule": schedule, "table": table, "configured": current_report, "density_50_steps": density,
            "budget_db": budget}


def choose(table: dict, cands: list, measured: list, budget: float) -> list:
    """Per σ of the table: the cheapest candidate within `budget` dB (ties: the coarsest quantization); where none
    is, the measured regime with the highest SQNR (for metric=attention that is exact dense attention)."""
    chosen = []
    for row in table.values():
        ok = [c for c in cands if row[c.name][0] >= budget]
        if ok:
            cost = {c.name: row[c.name][1] * (0.5 if c.quantized else 1.0) for c in ok}
            chosen.append(min(ok, key=lambda c: (cost[c.name], COARSENESS[c.quant.group if c.quant else None])))
        else:
            chosen.append(max(measured, key=lambda c: row[c.name][0]))
    return chosen


def budget_for_density(table: dict, cands: list, measured: list, max_density: float) -> float:
    """The highest budget (dB) whose chosen schedule averages at most `max_density` over Wan's 50 sampling steps:
    the sparsity spent where it costs the least SQNR, the worst σ as good as the density allows."""
    def density(budget: float) -> float:
        return sampling_density(table, choose(table, cands, measured, budget))

    fits = [b for b in sorted({v[0] for row in table.values() for v in row.values()}) if density(b) <= max_density]
    if not fits:
        raise ValueError(f"max_density={max_density}: no schedule of these candidates is that sparse (the "
                         f"sparsest averages {density(-math.inf):.3f} over 50 sampling steps)")
    return fits[-1]


def sampling_density(table: dict, chosen: list) -> float:
    """Mean realised density over Wan's 50 sampling steps (shift 5) of the per-σ choices: each step takes the
    density measured at the grid σ whose interval (as merge() draws them) holds it."""
    sigmas = sorted(table)
    inner = [(a + b) / 2 for a, b in zip(sigmas, sigmas[1:])]  # merge()'s boundaries
    per_step = [table[sigmas[i]][chosen[i].name][1] for i in (bisect_right(inner, s) for s in sampling_sigmas())]
    return sum(per_step) / len(per_step)


def merge(sigmas: list[float], chosen: list, tile_shape) -> Schedule:
    """Runs of equal choices → regimes; boundaries half-way between grid points, the ends at 0 and 1."""
    bounds = [0.0] + [(a + b) / 2 for a, b in zip(sigmas, sigmas[1:])] + [1.0]
    runs: list[list] = []  # [candidate, lo, hi]
    for i, cand in enumerate(chosen):
        if runs and runs[-1][0] is cand:
            runs[-1][2] = bounds[i + 1]
        else:
            runs.append([cand, bounds[i], bounds[i + 1]])
    regimes = [regime_config(cand, f"r{j}_{cand.name}", (lo, hi)) for j, (cand, lo, hi) in enumerate(runs)]
    return Schedule.from_config(FPSConfig(regimes=regimes), tile_shape)


def write_schedule(schedule: Schedule, cfg: CalibrateConfig, table: dict, path: Path, density: float,
                   budget: float) -> None:
    names = list(next(iter(table.values())))
    what = ("attention, worst layer, vs dense bf16" if cfg.metric == "attention" else
            f"the model's prediction vs the dense prediction of {cfg.reference_weights or 'the same weights'}")
    lines = [f"# Calibrated by `python -m fpsa_train.calibrate`: model {cfg.model.name}, weights "
             f"{cfg.checkpoint or cfg.model.weights}, budget {budget:.1f} dB ({what}), {cfg.samples} clips per σ"
             + (f", the highest budget averaging ≤ {cfg.max_density} density." if cfg.max_density else "."),
             f"# Mean density over Wan's 50 sampling steps (flow UniPC, shift 5): {density:.3f}.",
             "# SQNR dB / density per σ and candidate:",
             "#   σ     " + " ".join(f"{n:>22}" for n in names)]
    for sigma, row in table.items():
        lines.append(f"#   {sigma:.2f}  " + " ".join(f"{row[n][0]:>14.1f} / {row[n][1]:.2f}" for n in names))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "\n".join(lines) + "\n" + OmegaConf.to_yaml(OmegaConf.create(schedule.to_dict())))
    log.info("calibrated schedule → %s (mean density over 50 sampling steps %.3f)\n  %s", path, density,
             "\n  ".join(r.describe() for r in schedule.regimes))


@hydra.main(config_path="../configs", config_name="calibrate", version_base="1.3")
def main(cfg) -> None:
    conf = resolve(cfg)
    calibrate(conf)


if __name__ == "__main__":
    main()
