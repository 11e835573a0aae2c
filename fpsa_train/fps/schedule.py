"""The step-aware schedule: which quantization granularity and which sparsity pattern at which noise level σ.

A schedule is an ordered list of regimes, each owning an interval of σ ∈ [0, 1] (σ = 1 is pure noise, the first
sampling step). Together the intervals cover [0, 1] exactly: no gap, no overlap; a regime owns [lo, hi) and the
last one also owns σ = 1. Training draws σ per sample and runs that sample through the regime that owns it, so
each regime is trained exactly as it will be deployed; the sampler picks the regime from the current σ.

A regime is (quantization, sparsity):
- `quant`: null (no quantization) or a `QuantGranularity` group for Q/K scales (fps/fp8.py): `tiles` (coarse:
  a block of factor tiles), `tile`, `subtile` (tile split by factor), `token`. V is always per channel and P
  always uses the fixed scale 448 when `quant` is set.
- `sparsity.pattern`: `dense`, `window` (static 3D sliding window in tiles), `topk` (dynamic top-k per query
  tile by pooled Q·K scores; k given as a count, `topk`, or as a share of the key tiles, `topk_fraction`, which
  keeps the same density at every resolution), `window_topk` (their union), or `learned` (trainable selector
  aiming at `target_density`, unioned with the window when `window` is given).

The config dataclasses here are the Hydra schema of the `fps` group; `Schedule.from_config` validates them and
names the bad field (`fps.regimes[1].sparsity.window`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from fpsa_train.fps.fp8 import QuantGranularity

PATTERNS = ("dense", "window", "topk", "window_topk", "learned")


@dataclass
class QuantConfig:
    group: str = "tile"
    """Q/K scale group: `tiles` (coarse), `tile`, `subtile` (fine) or `token`."""
    factor: list[int] = field(default_factory=lambda: [1, 1, 1])
    """Tiles per group (`tiles`) or splits per tile axis (`subtile`), per axis (t, h, w)."""


@dataclass
class SparsityConfig:
    pattern: str = "dense"
    """`dense`, `window`, `topk`, `window_topk` or `learned`."""
    window: Optional[list[int]] = None
    """Window extent in tiles per axis (t, h, w), centred on the query tile, clipped at the grid edges."""
    topk: Optional[int] = None
    """Key tiles kept per query tile by pooled Q·K score (own tile included)."""
    topk_fraction: Optional[float] = None
    """Instead of `topk`: the share of the key tiles kept, k = max(1, round(fraction · tiles)) per call, so a
    schedule keeps the same density at 480p, 720p and on the proving ground (give one of topk, topk_fraction)."""
    target_density: Optional[float] = None
    """Fraction of key tiles the learned selector aims to keep (its regulariser holds it there)."""
    temperature: float = 1.0
    """Temperature of the learned selector's sigmoid surrogate."""


@dataclass
class RegimeConfig:
    name: str = "???"
    """Short name, used in logs (`train/loss/<name>`) and in the exported schedule."""
    sigma: list[float] = field(default_factory=lambda: [0.0, 1.0])
    """[lo, hi): the noise levels this regime owns (the last regime also owns σ = 1)."""
    quant: Optional[QuantConfig] = None
    """Quantization of Q/K (V per channel, P fixed-scale follow it); null = no quantization."""
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    """Which tile pairs are computed."""


BACKENDS = ("auto", "reference", "kernel")
"""fps.backend values: which implementation runs FPS attention (see FPSConfig.backend)."""


@dataclass
class FPSConfig:
    enabled: bool = True
    """Swap the DiT's self-attention for FPS attention; false keeps dense SDPA."""
    regimes: list[RegimeConfig] = field(default_factory=lambda: [RegimeConfig(name="all")])
    """The schedule, ordered by σ."""
    schedule_file: Optional[str] = None
    """A YAML file with `regimes:` (e.g. written by `python -m fpsa_train.calibrate`) used instead of `regimes`."""
    selector_reg_weight: float = 0.01
    """Weight of the learned selectors' density regulariser in the training loss."""
    materialize: bool = False
    """Use the fully materialised reference (tiny shapes only) instead of the tile loop."""
    backend: str = "auto"
    """Which implementation runs each regime (fps/transform.py `reference_reason`). auto: the Hopper FP8 kernel
    (fpsa_kernels: its forward, and its Triton backward when training) on a CUDA device where it runs (H100/H200),
    for the regimes it implements (FP8-quantized ones, at its head dims), the PyTorch reference for the
    other regimes and on other devices; reference: always the PyTorch reference; kernel: as auto, but an error
    where the kernel cannot run instead of the fallback (on CPU it runs under TRITON_INTERPRET=1, for tests);
    regimes it does not implement still run in the reference. `materialize` overrides both with the reference."""


@dataclass(frozen=True)
class Regime:
    """One validated regime, the runtime form of a RegimeConfig (`regime_from_config` builds and checks it;
    `regime_config` is the inverse). Constructed directly (tests, benchmarks) it is not validated: name the fields
    by keyword, e.g. `Regime(name="late", quant=QuantGranularity("tile"), pattern="window_topk", window=(6, 6, 3),
    topk=4)`; the defaults are RegimeConfig's: σ ∈ [0, 1], no quantization, dense. The field order is positional API
    (`regime_from_config`)."""

    name: str
    """As RegimeConfig.name."""
    lo: float = 0.0
    """Lower end of the σ interval it owns, [lo, hi)."""
    hi: float = 1.0
    """Upper end (owned too when it is 1)."""
    quant: Optional[QuantGranularity] = None
    """Q/K scale group; None (the default, as RegimeConfig's `quant: null`): no quantization."""
    pattern: str = "dense"
    """One of PATTERNS."""
    window: Optional[tuple[int, int, int]] = None
    """Window extent in tiles (t, h, w) for `window`, `window_topk` and optionally `learned`; None otherwise."""
    topk: Optional[int] = None
    """Key tiles kept per query tile for `topk` and `window_topk` (or None with `topk_fraction`)."""
    target_density: Optional[float] = None
    """The learned selector's target density (`learned` only)."""
    temperature: float = 1.0
    """The learned selector's sigmoid temperature (SparsityConfig.temperature)."""
    topk_fraction: Optional[float] = None
    """Instead of `topk`: the share of the key tiles kept (`topk_of`)."""

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def topk_of(self, tiles: int) -> int:
        """k for a grid of `tiles` key tiles: `topk`, or `topk_fraction` of them (at least 1)."""
        if self.topk_fraction is not None:
            return max(1, round(self.topk_fraction * tiles))
        if self.topk is None:
            raise ValueError(f"regime {self.name!r} ({self.pattern}) has no top-k")
        return self.topk

    def describe(self) -> str:
        q = "no quant" if self.quant is None else f"fp8 {self.quant.group}{list(self.quant.factor)}"
        s = self.pattern
        if self.window:
            s += f" window={list(self.window)}"
        if self.topk:
            s += f" topk={self.topk}"
        if self.topk_fraction is not None:
            s += f" top {100 * self.topk_fraction:g}% of the tiles"
        if self.target_density:
            s += f" density={self.target_density}"
        return f"{self.name}: σ∈[{self.lo:g}, {self.hi:g}{']' if self.hi == 1 else ')'} {q}, {s}"


class ScheduleError(ValueError):
    """A schedule that does not validate; the message names the field."""


def regime_from_config(cfg: RegimeConfig, where: str, tile_shape: tuple[int, int, int]) -> Regime:
    """A validated Regime; errors name the field, prefixed by `where` (e.g. `fps.regimes[1]`)."""
    if len(cfg.sigma) != 2 or not 0 <= cfg.sigma[0] < cfg.sigma[1] <= 1:
        raise ScheduleError(f"{where}.sigma={list(cfg.sigma)}: expected [lo, hi] with 0 <= lo < hi <= 1")
    quant = None
    if cfg.quant is not None:
        try:
            quant = QuantGranularity(cfg.quant.group, tuple(int(f) for f in cfg.quant.factor))
            quant.group_shape(tile_shape)
        except ValueError as err:
            raise ScheduleError(f"{where}.quant: {err}") from None
    sp = cfg.sparsity
    if sp.pattern not in PATTERNS:
        raise ScheduleError(f"{where}.sparsity.pattern={sp.pattern!r}: expected one of {PATTERNS}")
    needs_window = sp.pattern in ("window", "window_topk")
    if needs_window and sp.window is None:
        raise ScheduleError(f"{where}.sparsity.window is required for pattern {sp.pattern!r}")
    if sp.window is not None and (len(sp.window) != 3 or any(int(w) < 1 for w in sp.window)):
        raise ScheduleError(f"{where}.sparsity.window={list(sp.window)}: expected three extents >= 1 (tiles)")
    if sp.pattern in ("topk", "window_topk"):
        if (sp.topk is None) == (sp.topk_fraction is None):
            raise ScheduleError(f"{where}.sparsity: pattern {sp.pattern!r} needs one of topk (a count >= 1) and "
                                f"topk_fraction (a share in (0, 1]); got topk={sp.topk}, "
                                f"topk_fraction={sp.topk_fraction}")
        if sp.topk is not None and sp.topk < 1:
            raise ScheduleError(f"{where}.sparsity.topk={sp.topk}: pattern {sp.pattern!r} needs topk >= 1")
        if sp.topk_fraction is not None and not 0 < sp.topk_fraction <= 1:
            raise ScheduleError(f"{where}.sparsity.topk_fraction={sp.topk_fraction}: expected a share in (0, 1]")
    if sp.pattern == "learned":
        if sp.target_density is None or not 0 < sp.target_density <= 1:
            raise ScheduleError(f"{where}.sparsity.target_density={sp.target_density}: expected a value in (0, 1]")
        if sp.temperature <= 0:
            raise ScheduleError(f"{where}.sparsity.temperature={sp.temperature} must be > 0")
    window = tuple(int(w) for w in sp.window) if sp.window is not None and sp.pattern != "dense" else None
    return Regime(cfg.name, float(cfg.sigma[0]), float(cfg.sigma[1]), quant, sp.pattern, window,
                  sp.topk if sp.pattern in ("topk", "window_topk") else None,
                  sp.target_density if sp.pattern == "learned" else None, float(sp.temperature),
                  float(sp.topk_fraction) if sp.pattern in ("topk", "window_topk") and sp.topk_fraction else None)


@dataclass(frozen=True)
class Schedule:
    regimes: tuple[Regime, ...]

    @staticmethod
    def from_config(cfg: FPSConfig, tile_shape: tuple[int, int, int]) -> "Schedule":
        regimes_cfg = cfg.regimes
        source = "fps.regimes"
        if cfg.schedule_file:
            regimes_cfg = load_schedule_file(cfg.schedule_file)
            source = f"{cfg.schedule_file}: regimes"
        if not regimes_cfg:
            raise ScheduleError(f"{source} is empty: give at least one regime covering σ ∈ [0, 1]")
        regimes = [regime_from_config(r, f"{source}[{i}]", tuple(tile_shape)) for i, r in enumerate(regimes_cfg)]
        names = [r.name for r in regimes]
        if len(set(names)) != len(names) or any(n in ("", "???") for n in names):
            raise ScheduleError(f"{source}: regime names must be set and unique, got {names}")
        ordered = sorted(regimes, key=lambda r: r.lo)
        if ordered[0].lo != 0:
            raise ScheduleError(f"{source}: σ from 0 to {ordered[0].lo:g} is not covered (first regime "
                                f"{ordered[0].name!r} starts at {ordered[0].lo:g})")
        if ordered[-1].hi != 1:
            raise ScheduleError(f"{source}: σ from {ordered[-1].hi:g} to 1 is not covered (regime "
                                f"{ordered[-1].name!r} ends at {ordered[-1].hi:g})")
        for a, b in zip(ordered, ordered[1:]):
            if a.hi < b.lo:
                raise ScheduleError(f"{source}: gap in σ between {a.hi:g} ({a.name!r}) and {b.lo:g} ({b.name!r})")
            if a.hi > b.lo:
                raise ScheduleError(f"{source}: regimes {a.name!r} [{a.lo:g}, {a.hi:g}) and {b.name!r} "
                                    f"[{b.lo:g}, {b.hi:g}) overlap")
        return Schedule(tuple(ordered))

    def regime_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the regime that owns each σ (int64, same shape as sigma). Boundaries are compared in fp32,
        the dtype σ has in training and sampling, so σ = 0.9 lands in the regime that starts at 0.9."""
        edges = torch.tensor([r.hi for r in self.regimes[:-1]], dtype=torch.float32, device=sigma.device)
        return torch.bucketize(sigma.detach().float(), edges, right=True)

    def regime_for(self, sigma: float) -> Regime:
        return self.regimes[int(self.regime_index(torch.tensor([sigma]))[0])]

    def validate_grid(self, tile_grid: tuple[int, int, int], grid: tuple[int, int, int]) -> None:
        """The check that needs the token grid (`grid`, split into `tile_grid` tiles): a regime's top-k count
        (`topk` > 1; a `topk_fraction` always fits) may not exceed the number of tiles. Raises ScheduleError."""
        for r in self.regimes:
            if r.pattern in ("topk", "window_topk") and r.topk and r.topk > 1 and r.topk > _prod(tile_grid):
                raise ScheduleError(f"regime {r.name!r}: topk={r.topk} exceeds the {_prod(tile_grid)} tiles of the "
                                    f"token grid {tuple(grid)}")

    def to_dict(self) -> dict:
        """Plain-data form (what the configs accept and export writes as JSON)."""
        return {"regimes": [OmegaConf.to_container(OmegaConf.structured(regime_config(r))) for r in self.regimes]}


def regime_config(regime: Regime, name: str | None = None, sigma: tuple[float, float] | None = None) -> RegimeConfig:
    """The config form of a regime (optionally renamed or moved to another σ interval)."""
    quant = None if regime.quant is None else QuantConfig(regime.quant.group, list(regime.quant.factor))
    sparsity = SparsityConfig(regime.pattern, None if regime.window is None else list(regime.window), regime.topk,
                              regime.topk_fraction, regime.target_density, regime.temperature)
    lo, hi = sigma if sigma is not None else (regime.lo, regime.hi)
    return RegimeConfig(name or regime.name, [lo, hi], quant, sparsity)


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= int(x)
    return n


def fps_enabled(cfg: FPSConfig) -> bool:
    """Whether FPS attention is on: `cfg.enabled`, unless `cfg.schedule_file` is a file that says `enabled: false`
    (configs/fps/dense.yaml): the file decides, as it decides the regimes, for training and export alike."""
    if not cfg.enabled:
        return False
    if cfg.schedule_file and Path(cfg.schedule_file).is_file():
        return OmegaConf.load(cfg.schedule_file).get("enabled", True) is not False
    return True


def load_schedule_file(path: str | Path) -> list[RegimeConfig]:
    """Regimes from a YAML file with a top-level `regimes:` list, type-checked against RegimeConfig."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"fps.schedule_file={str(path)!r} does not exist")
    raw = OmegaConf.load(path)  # YAML, or the JSON an export writes
    if "regimes" not in raw:
        raise ScheduleError(f"{path}: expected a top-level `regimes:` list")
    return regimes_from_data(raw.regimes)


def regimes_from_data(regimes) -> list[RegimeConfig]:
    """Plain-data regimes (a list of dicts, as `Schedule.to_dict` writes them) type-checked against RegimeConfig."""
    merged = OmegaConf.merge(OmegaConf.structured(FPSConfig), {"regimes": regimes})
    return OmegaConf.to_object(merged).regimes


def schedule_from_data(data: dict | None, tile_shape: tuple[int, int, int]) -> Schedule | None:
    """The inverse of `Schedule.to_dict` (validated); None for no or empty regimes (FPS attention off)."""
    if not data or not data.get("regimes"):
        return None
    return Schedule.from_config(FPSConfig(regimes=regimes_from_data(data["regimes"])), tuple(tile_shape))
