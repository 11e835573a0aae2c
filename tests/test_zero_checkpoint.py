"""The DeepSpeed ZeRO checkpoint reader against DeepSpeed's own consolidation, and export from a ZeRO folder.

The fixtures are real DeepSpeed 0.19.8 checkpoints (world size 2: ZeRO-2 and ZeRO-3, odd-sized parameters so the
partitions carry padding) with DeepSpeed's `zero_to_fp32` result beside them: scripts/make_zero_fixtures.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fpsa_train.deploy import load_deploy
from fpsa_train.export import ExportConfig, export
from fpsa_train.lit.zero_checkpoint import read_zero_checkpoint
from fpsa_train.models.checkpoint_config import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "zero"


@pytest.mark.parametrize("stage", [2, 3])
def test_consolidation_equals_deepspeeds(stage):
    weights, client = read_zero_checkpoint(FIXTURES / f"zero{stage}" / "ckpt")
    reference = load_file(FIXTURES / f"zero{stage}" / "reference.safetensors")
    assert weights.keys() == reference.keys()
    for k, v in reference.items():
        assert weights[k].dtype == torch.float32 and torch.equal(weights[k], v), k
    assert client["global_step"] == 2 and client["ds_config"]["zero_optimization"]["stage"] == stage
    assert "fpsa_run_config" in client


@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_file_names_are_read(stage, tmp_path):
    """Regression: under bf16, DeepSpeed names the optimizer partitions `bf16_zero_pp_rank_N_...`, which the reader
    refused as "not a ZeRO checkpoint" (exporting the wan14b experiment's bf16 ZeRO-3 checkpoint failed)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / f"zero{stage}" / "ckpt", ckpt)
    renamed = 0
    for f in ckpt.rglob("zero_pp_rank_*_optim_states.pt"):
        f.rename(f.with_name("bf16_" + f.name))
        renamed += 1
    assert renamed == 2
    weights, _ = read_zero_checkpoint(ckpt)
    reference = load_file(FIXTURES / f"zero{stage}" / "reference.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], v) for k, v in reference.items())


def test_export_from_zero2_uses_the_ema_and_from_zero3_the_weights(tmp_path):
    two = export(ExportConfig(checkpoint=str(FIXTURES / "zero2" / "ckpt"), out=str(tmp_path / "z2"),
                              dtype="float32"))
    ema = load_file(FIXTURES / "zero2" / "ema_reference.safetensors")
    model = load_deploy(two["out"]).model.state_dict()
    assert two["weights"] == "ema" and all(torch.equal(model[k], v) for k, v in ema.items())

    three = export(ExportConfig(checkpoint=str(FIXTURES / "zero3" / "ckpt"), out=str(tmp_path / "z3")))
    reference = load_file(FIXTURES / "zero3" / "reference.safetensors")
    model = load_deploy(three["out"]).model.state_dict()
    assert three["weights"] == "live"  # the ZeRO-3 fixture was trained without EMA
    assert all(torch.equal(model[k[len("model."):]], v.to(torch.bfloat16).float()) for k, v in reference.items())


def test_truncated_or_incomplete_folders_are_refused(tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / "zero3" / "ckpt", broken)
    optim = broken / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_zero_checkpoint(broken)
    optim.unlink()  # rank 1 missing: only rank 0's partition is left, which cannot hold every parameter
    with pytest.raises(CheckpointError, match="not a ZeRO-3 layout|needs elements"):
        read_zero_checkpoint(broken)
    (broken / "latest").unlink()
    shutil.rmtree(broken / "checkpoint")
    with pytest.raises(CheckpointError, match="no `latest` file"):
        read_zero_checkpoint(broken)
