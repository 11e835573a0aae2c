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


@pytest.fixture(scope="session")
def tiny_components(tmp_path_factory) -> Path:
    """Untrained tiny Wan-layout VAE, UMT5 and tokenizer (fast to build; decodes to noise-like video)."""
    from fpsa_train.data.tiny_models import build_tiny_wan_components

    folder = tmp_path_factory.mktemp("components") / "components"
    build_tiny_wan_components(folder, None, seed=0)
    return folder
