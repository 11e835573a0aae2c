"""Calibration: measures candidates, respects the budget, writes a schedule file the configs accept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fpsa_train.calibrate import calibrate
from fpsa_train.config import resolve
from fpsa_train.fps.schedule import Schedule
from tests.conftest import CONFIGS, compose_train


def calibrate_config(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="calibrate", overrides=[
            f"output={tmp_path}/schedule.yaml", "sigmas=[0.2,0.5,0.9]", "samples=1",
            "quant=[null,{group:tile},{group:tiles,factor:[2,2,2]}]",
            "sparsity=[{pattern:dense},{pattern:window,window:[3,3,1]}]", *overrides])
    return resolve(cfg)


def test_impossible_budget_falls_back_to_exact_dense(tmp_path):
    result = calibrate(calibrate_config(tmp_path, "budget_db=1000"))
    assert [r.name for r in result["schedule"].regimes] == ["r0_noquant-dense"]
    assert len(result["table"]) == 3 and all(len(row) == 6 for row in result["table"].values())


def test_zero_budget_takes_the_most_aggressive_candidate(tmp_path):
    result = calibrate(calibrate_config(tmp_path, "budget_db=-1000"))
    (regime,) = result["schedule"].regimes
    assert regime.quant.group == "tiles" and regime.window == (3, 3, 1)


def test_output_is_a_schedule_file_the_training_config_accepts(tmp_path):
    result = calibrate(calibrate_config(tmp_path, "budget_db=30"))
    sched = result["schedule"]
    path = tmp_path / "schedule.yaml"
    assert path.read_text().startswith("# Calibrated by")
    conf = resolve(compose_train(["+experiment=tiny", f"fps.schedule_file={path}"], tmp_path))
    assert Schedule.from_config(conf.fps, tuple(conf.model.tile_shape)) == sched
    # every σ the table reports is within budget under the chosen regime, or the regime is exact dense
    for sigma, row in result["table"].items():
        regime = sched.regime_for(sigma)
        chosen = next(v for k, v in row.items() if regime.name.endswith(k))
        assert chosen[0] >= 30 or regime.name.endswith("noquant-dense")


def test_output_metric_measures_the_prediction_against_the_dense_reference(tmp_path, trained_checkpoint):
    """metric=output: the prediction with each candidate in every layer vs the dense prediction. The unquantized
    dense candidate reproduces it (the reference in fp32); a reference model with other weights costs every
    candidate what the weights moved; top-k shares keep their density; the header gives the 50-step density."""
    from safetensors.torch import load_file, save_file

    from fpsa_train.export import ExportConfig, export

    deploy = export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / "deploy")))["out"]
    weights = f"{deploy}/diffusion_pytorch_model.safetensors"
    moved = load_file(weights)
    name = next(k for k in moved if k.startswith("head.head.weight"))
    moved[name] = moved[name] + 0.3 * moved[name].std() * torch.randn_like(moved[name])
    save_file(moved, tmp_path / "moved.safetensors")
    common = ["metric=output", f"model.weights={weights}", "candidates=topk",
              "quant=[null,{group:tile}]", "sparsity=[{pattern:dense},{pattern:topk,topk_fraction:0.25}]"]

    own = calibrate(calibrate_config(tmp_path, *common, "budget_db=-1000"))
    for row in own["table"].values():
        assert row["noquant-dense"][0] > 60  # the FPS reference without FP8 or sparsity is exact attention
        assert row["tile-dense"][0] < row["noquant-dense"][0] and row["tile-top25%"][1] == 0.25
    # at no budget the cheapest candidate everywhere: FP8 top-25% (cost 0.125), so 0.25 over all 50 steps
    assert [r.name for r in own["schedule"].regimes] == ["r0_tile-top25%"]
    assert own["density_50_steps"] == 0.25
    assert "Mean density over Wan's 50 sampling steps (flow UniPC, shift 5): 0.250" in \
        (tmp_path / "schedule.yaml").read_text()

    other = calibrate(calibrate_config(tmp_path, *common, f"reference_weights={tmp_path / 'moved.safetensors'}",
                                       "budget_db=-1000"))
    for sigma, row in other["table"].items():
        assert row["noquant-dense"][0] < 40 < own["table"][sigma]["noquant-dense"][0]


def test_unknown_metric_is_named(tmp_path):
    with pytest.raises(ValueError, match="metric='psnr'"):
        calibrate(calibrate_config(tmp_path, "metric=psnr"))


def test_max_density_spends_the_sparsity_where_it_costs_least():
    """max_density: the highest budget whose schedule averages at most that density over the 50 sampling steps.
    A synthetic table where sparsity hurts most at low σ: the low-σ steps stay dense, the rest go sparse."""
    from fpsa_train.calibrate import budget_for_density, choose, sampling_density
    from fpsa_train.fps.schedule import QuantConfig, RegimeConfig, SparsityConfig, regime_from_config

    tile = (2, 4, 4)
    cands = [regime_from_config(RegimeConfig(name, [0.0, 1.0], QuantConfig("tile"), SparsityConfig(**sp)), "c", tile)
             for name, sp in (("tile-dense", {"pattern": "dense"}),
                              ("tile-top50%", {"pattern": "topk", "topk_fraction": 0.5}),
                              ("tile-top25%", {"pattern": "topk", "topk_fraction": 0.25}))]
    table = {0.05: {"tile-dense": (30.0, 1.0), "tile-top50%": (20.0, 0.5), "tile-top25%": (10.0, 0.25)},
             0.5: {"tile-dense": (30.0, 1.0), "tile-top50%": (28.0, 0.5), "tile-top25%": (25.0, 0.25)},
             0.95: {"tile-dense": (30.0, 1.0), "tile-top50%": (27.0, 0.5), "tile-top25%": (24.0, 0.25)}}

    def density(budget):
        return sampling_density(table, choose(table, cands, cands, budget))

    budget = budget_for_density(table, cands, cands, 0.3)
    assert density(budget) <= 0.3 < density(budget + 1e-6)
    # the few low-σ steps (σ < 0.275: 3 of 50) can afford dense; 24 dB is then the worst σ's, and asking more would
    # put the high-σ steps at 50%
    assert [c.name for c in choose(table, cands, cands, budget)] == ["tile-dense", "tile-top25%", "tile-top25%"]
    assert budget == 24.0 and density(budget) == pytest.approx((3 * 1.0 + 47 * 0.25) / 50)
    with pytest.raises(ValueError, match="max_density=0.1: no schedule of these candidates is that sparse"):
        budget_for_density(table, cands, cands, 0.1)


ZERO = Path(__file__).parent / "fixtures" / "zero"  # DeepSpeed checkpoints of a micro DiT (test_zero_checkpoint.py)
ZERO_MODEL = ["model.dim=16", "model.ffn_dim=16", "model.num_heads=2", "model.num_layers=1", "model.text_dim=8",
              "model.freq_dim=8", "model.in_dim=3", "model.out_dim=3", "model.patch_size=[1,1,1]",
              "model.tile_shape=[1,2,2]", "fps.regimes.1.quant.factor=[1,2,2]", "data.latent_frames=2",
              "data.latent_height=4", "data.latent_width=4", "data.text_tokens=4"]


@pytest.mark.parametrize("stage", [2, 3])
def test_weights_from_a_zero_folder_are_the_consolidated_ones(stage):
    """checkpoint= a DeepSpeed ZeRO checkpoint folder (the training-checkpoint reader, as export reads it): the EMA
    where the run kept one (the ZeRO-2 fixture), else the fp32 master weights (ZeRO-3, trained without EMA)."""
    from safetensors.torch import load_file

    from fpsa_train.calibrate import load_weights
    from fpsa_train.deploy import model_config
    from fpsa_train.lit.training_checkpoint import client_state
    from fpsa_train.models.wan import WanModel

    ckpt = ZERO / f"zero{stage}" / "ckpt"
    model = WanModel(model_config(client_state(ckpt)["fpsa_run_config"]))
    assert load_weights(model, str(ckpt), "auto") == ("ema" if stage == 2 else "live")
    reference = load_file(ZERO / f"zero{stage}" / "reference.safetensors")  # DeepSpeed's own consolidation
    expected = {k.removeprefix("model."): v for k, v in reference.items()}
    if stage == 2:
        expected.update(load_file(ZERO / "zero2" / "ema_reference.safetensors"))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items() if ".self_attn.core." not in k)
    assert load_weights(model, str(ckpt), "live") == "live"


def test_calibrate_takes_a_zero_folder(tmp_path):
    ckpt = ZERO / "zero2" / "ckpt"
    result = calibrate(calibrate_config(tmp_path, *ZERO_MODEL, f"checkpoint={ckpt}", "sigmas=[0.5]",
                                        "quant=[null,{group:tile}]", "sparsity=[{pattern:dense}]"))
    assert list(result["table"]) == [0.5] and len(result["table"][0.5]) == 2
    assert f"weights {ckpt}, budget" in (tmp_path / "schedule.yaml").read_text()
