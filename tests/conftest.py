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
