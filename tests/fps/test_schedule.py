"""Schedule validation (errors name the bad field) and regime lookup; every fps config composes."""

from __future__ import annotations

import pytest
import torch

from fpsa_train.config import resolve
from fpsa_train.fps.schedule import (FPSConfig, QuantConfig, RegimeConfig, Schedule, ScheduleError, SparsityConfig,
                                     load_schedule_file)
from tests.conftest import compose_train

TILE = (6, 8, 8)


def regimes(*spans, **sparsity) -> FPSConfig:
    return FPSConfig(regimes=[RegimeConfig(name=f"r{i}", sigma=list(s), sparsity=SparsityConfig(**sparsity))
                              for i, s in enumerate(spans)])


def test_regime_lookup_half_open_intervals():
    sched = Schedule.from_config(regimes([0.9, 1.0], [0.0, 0.4], [0.4, 0.9]), TILE)  # any order in the file
    assert [r.name for r in sched.regimes] == ["r1", "r2", "r0"]  # sorted by σ
    sigma = torch.tensor([0.0, 0.39999, 0.4, 0.8999, 0.9, 1.0])
    assert sched.regime_index(sigma).tolist() == [0, 0, 1, 1, 2, 2]
    assert sched.regime_for(1.0).name == "r0" and sched.regime_for(0.4).name == "r2"


@pytest.mark.parametrize("spans, message", [
    ([[0.1, 1.0]], "from 0 to 0.1 is not covered"),
    ([[0.0, 0.8]], "from 0.8 to 1 is not covered"),
    ([[0.0, 0.5], [0.6, 1.0]], "gap in σ between 0.5"),
    ([[0.0, 0.6], [0.5, 1.0]], "overlap"),
    ([[0.5, 0.5], [0.0, 0.5]], r"fps\.regimes\[0\]\.sigma"),
])
def test_coverage_errors(spans, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_config(regimes(*spans), TILE)


@pytest.mark.parametrize("sparsity, field", [
    (dict(pattern="diagonal"), r"regimes\[0\]\.sparsity\.pattern"),
    (dict(pattern="window"), r"regimes\[0\]\.sparsity\.window is required"),
    (dict(pattern="window", window=[3, 0, 3]), r"regimes\[0\]\.sparsity\.window=\[3, 0, 3\]"),
    (dict(pattern="topk", topk=0), r"regimes\[0\]\.sparsity\.topk"),
    (dict(pattern="topk"), r"regimes\[0\]\.sparsity: pattern 'topk' needs one of topk"),
    (dict(pattern="topk", topk=4, topk_fraction=0.25), r"regimes\[0\]\.sparsity: .* got topk=4, topk_fraction=0.25"),
    (dict(pattern="window_topk", window=[1, 1, 1], topk_fraction=1.5), r"regimes\[0\]\.sparsity\.topk_fraction"),
    (dict(pattern="learned", target_density=1.5), r"regimes\[0\]\.sparsity\.target_density"),
    (dict(pattern="learned", target_density=0.3, temperature=0), r"regimes\[0\]\.sparsity\.temperature"),
])
def test_sparsity_errors_name_the_field(sparsity, field):
    with pytest.raises(ScheduleError, match=field):
        Schedule.from_config(regimes([0.0, 1.0], **sparsity), TILE)


def test_quant_group_must_fit_the_tile():
    cfg = FPSConfig(regimes=[RegimeConfig(name="a", sigma=[0, 1], quant=QuantConfig("subtile", [4, 2, 2]))])
    with pytest.raises(ScheduleError, match=r"regimes\[0\]\.quant"):
        Schedule.from_config(cfg, TILE)  # 6 frames do not split in 4
    cfg.regimes[0].quant.group = "blocks"
    with pytest.raises(ScheduleError, match=r"regimes\[0\]\.quant"):
        Schedule.from_config(cfg, TILE)


def test_duplicate_names_rejected():
    cfg = regimes([0.0, 0.5], [0.5, 1.0])
    cfg.regimes[1].name = "r0"
    with pytest.raises(ScheduleError, match="unique"):
        Schedule.from_config(cfg, TILE)


@pytest.mark.parametrize("option", ["default", "dense", "fp8_only", "sparse_only", "learned"])
def test_every_fps_option_composes_and_validates(option, tmp_path):
    conf = resolve(compose_train(["+experiment=tiny", f"fps={option}"], tmp_path))
    sched = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    assert sched.regimes[0].lo == 0 and sched.regimes[-1].hi == 1
    assert conf.fps.enabled == (option != "dense")


def test_invalid_schedule_fails_when_the_config_is_resolved(tmp_path):
    with pytest.raises(ScheduleError, match=r"regimes\[0\]\.sparsity\.window"):
        resolve(compose_train(["+experiment=tiny", "fps.regimes.0.sparsity.window=[0,1,1]"], tmp_path))


def test_schedule_file_round_trip(tmp_path):
    conf = resolve(compose_train(["+experiment=tiny"], tmp_path))
    sched = Schedule.from_config(conf.fps, TILE)
    from omegaconf import OmegaConf

    path = tmp_path / "schedule.yaml"
    OmegaConf.save(OmegaConf.create(sched.to_dict()), path)
    again = Schedule.from_config(FPSConfig(schedule_file=str(path)), TILE)
    assert again == sched
    assert load_schedule_file(path)[0].name == sched.regimes[0].name
    (tmp_path / "bad.yaml").write_text("regimes:\n  - name: x\n    sigma: [0, 1]\n    colour: red\n")
    with pytest.raises(Exception, match="colour"):
        load_schedule_file(tmp_path / "bad.yaml")


def test_topk_fraction_keeps_one_share_at_every_resolution(tmp_path):
    """A `topk_fraction` regime keeps round(f · tiles) key tiles per query tile whatever the grid (48 tiles on the
    proving ground, 112 at 480p, 240 at 720p), and survives the YAML round trip that export and deploy make."""
    from omegaconf import OmegaConf

    from fpsa_train.fps.reference import select_tiles
    from fpsa_train.models.token_order import TokenLayout

    sched = Schedule.from_config(regimes([0.0, 1.0], pattern="topk", topk_fraction=0.25), TILE)
    regime = sched.regimes[0]
    assert [regime.topk_of(n) for n in (48, 112, 240, 2)] == [12, 28, 60, 1]
    assert "top 25% of the tiles" in regime.describe()
    path = tmp_path / "schedule.yaml"
    OmegaConf.save(OmegaConf.create(sched.to_dict()), path)
    assert Schedule.from_config(FPSConfig(schedule_file=str(path)), TILE) == sched
    g = torch.Generator().manual_seed(0)
    for grid in ((4, 8, 8), (4, 16, 16)):  # 2×2×2 = 8 and 2×4×4 = 32 tiles of 2×4×4 tokens
        layout = TokenLayout(grid, "tile", (2, 4, 4))
        n = len(layout.tile_sizes())
        q, k = (torch.randn(1, 2, layout.seq_len, 16, generator=g) for _ in range(2))
        mask = select_tiles(q, k, layout, Schedule.from_config(
            regimes([0.0, 1.0], pattern="topk", topk_fraction=0.25), (2, 4, 4)).regimes[0]).mask.to_dense()
        assert mask.shape[-1] == n and (mask.sum(-1) == round(0.25 * n)).all(), grid
