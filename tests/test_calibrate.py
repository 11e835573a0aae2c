"""Calibration: measures candidates, respects the budget, writes a schedule file the configs accept."""

from __future__ import annotations

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
