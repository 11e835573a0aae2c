"""Shared test helpers: compose the project's Hydra configs exactly as `python -m fpsa_train` does."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import fpsa_train.config  # noqa: F401  (registers the schema)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def compose_train(overrides: list[str], run_dir: str | Path = "/tmp/fpsa-test-run") -> DictConfig:
    """The composed training config for `overrides`, with `run_dir` set (Hydra's runtime dir is absent in tests)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"run_dir={run_dir}"])


def make_regime(pattern: str = "dense", quant: str | None = "tile", *, factor: tuple[int, int, int] | None = None,
                name: str = "r", **fields):
    """A Regime for the tests over σ ∈ [0, 1]: `pattern`, Q/K scales grouped by `quant` (None: no quantization)
    with `factor` (default 2 per axis for `tiles` and `subtile`, the smallest that differs from `tile`; 1 for the
    others, which ignore it), and any other Regime field by keyword (window=, topk=, target_density=, ...)."""
    from fpsa_train.fps.fp8 import QuantGranularity
    from fpsa_train.fps.schedule import Regime

    if factor is None:
        factor = (2, 2, 2) if quant in ("tiles", "subtile") else (1, 1, 1)
    q = None if quant is None else QuantGranularity(quant, tuple(factor))
    return Regime(name=name, quant=q, pattern=pattern, **fields)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return ["+experiment=tiny"]


# A schedule with every kind of regime the export must carry: learned selectors (early), dense fine-grained FP8
# (middle), window ∪ top-k (late).
EXPORT_RUN = ["+experiment=tiny", "data=synthetic", "fps=learned", "fps.regimes.2.sparsity.pattern=window_topk",
              "fps.regimes.2.sparsity.topk=2", "trainer.max_steps=3", "trainer.val_every_n_steps=100",
              "trainer.checkpoint_every_n_steps=100", "data.num_samples=12", "data.val_samples=4",
              "data.batch_size=4", "data.latent_frames=3", "data.latent_height=8", "data.latent_width=16", "seed=5"]


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """`last.ckpt` of a 3-step tiny run (EMA on, learned + window_topk regimes), as training writes it."""
    from fpsa_train.train import train

    run = tmp_path_factory.mktemp("export_run")
    train(compose_train(EXPORT_RUN, run))
    return run / "checkpoints" / "last.ckpt"


KERNEL_SIZED = ["+experiment=tiny", "data=synthetic", "model.dim=256", "model.num_heads=2", "model.ffn_dim=512",
                "data.latent_frames=4", "data.latent_height=16", "data.latent_width=32"]
"""A tiny DiT the Hopper kernel runs: head_dim 128, tile 2×4×4 on a 4×8×16 token grid (2×2×4 tiles, so the default
schedule's windows drop tiles)."""


def export_random(tmp: Path, overrides: list[str], schedule=None, with_fps: bool = False,
                  name: str = "deploy") -> str:
    """A deploy folder of a randomly initialised DiT for `overrides`: a training checkpoint as fpsa writes it, then
    exported. The head is N(0, 0.02) (the published init zeroes it: every output would be 0). `schedule`: the run's
    (default: the config's); `with_fps`: FPS attention applied before saving, so learned selectors are in the state
    dict."""
    from fpsa_train.config import resolve
    from fpsa_train.export import ExportConfig, export
    from fpsa_train.fps.schedule import Schedule
    from fpsa_train.fps.transform import apply_fps_attention
    from fpsa_train.lit.module import RUN_CONFIG_KEY
    from fpsa_train.models.build import architecture_of
    from fpsa_train.models.wan import WanModel
    from fpsa_train.train import run_config

    conf = resolve(compose_train(overrides, tmp))
    schedule = schedule or Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    torch.manual_seed(0)
    model = WanModel(architecture_of(conf.model))
    if with_fps:
        apply_fps_attention(model, schedule)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                RUN_CONFIG_KEY: run_config(conf, schedule), "global_step": 0}, tmp / "last.ckpt")
    return export(ExportConfig(checkpoint=str(tmp / "last.ckpt"), out=str(tmp / name)))["out"]


@pytest.fixture(scope="session")
def kernel_sized_deploy(tmp_path_factory) -> str:
    """A deploy folder of a random KERNEL_SIZED DiT with the default schedule, for the GPU tests (skipped without
    CUDA: the tests that use it run the kernel)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return export_random(tmp_path_factory.mktemp("kernel_sized"), KERNEL_SIZED)


def kernel_sized_steps(deployed):
    """(latents, text, σ per regime) for one CFG-batch step of the KERNEL_SIZED model in each of its regimes."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 16, 32, generator=g).cuda()
    text = torch.randn(2, 512, 64, generator=g).cuda()
    return x, text, [(regime, (regime.lo + regime.hi) / 2) for regime in deployed.schedule.regimes]


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory) -> Path:
    """Untrained tiny Wan-layout VAE, UMT5 and tokenizer (fast to build; decodes to noise-like video)."""
    from fpsa_train.data.tiny_models import build_tiny_wan_components

    folder = tmp_path_factory.mktemp("components") / "components"
    build_tiny_wan_components(folder, None, seed=0)
    return folder
