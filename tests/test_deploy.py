"""The deploy runtime's evaluation variants: dense SDPA with the exported weights, and one regime forced on every
step."""

from __future__ import annotations

import pytest
import torch

from fpsa_train.deploy import DeployError, load_deploy
from fpsa_train.export import ExportConfig, export
from fpsa_train.fps.transform import fps_cores
from fpsa_train.models.wan import WanModel


@pytest.fixture(scope="module")
def deploy(trained_checkpoint, tmp_path_factory) -> str:
    return export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path_factory.mktemp("d") / "d")))["out"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 16, generator=g), torch.randn(1, 5, 64, generator=g)


def test_fps_false_is_the_same_weights_with_dense_attention(deploy):
    dense = load_deploy(deploy, fps=False)
    assert dense.schedule is None and not fps_cores(dense.model) and "fps=False" in dense.backend
    plain = WanModel(dense.model.cfg).eval()  # a DiT that never had FPS attention, with the exported weights
    plain.load_state_dict(dense.model.state_dict())
    x, text = _inputs()
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        expected = plain(x, sigma * 1000, text)
    assert torch.equal(dense.denoise(x, sigma, text), expected)
    assert dense.realised_density() == 1.0
    fps = load_deploy(deploy).denoise(x, sigma, text)
    assert ((fps - expected).norm() / expected.norm()).item() > 1e-4  # FP8 (σ = 0.5: dense, fine scales): far
    # above fp32 rounding (the runtime matches the trained model to 1e-6, tests/test_export.py)


def test_only_regime_runs_that_regime_at_every_sigma_and_restores_the_schedule(deploy):
    deployed = load_deploy(deploy, backend="reference")
    exported, described = deployed.schedule, deployed.backend
    x, text = _inputs()
    middle = next(r for r in exported.regimes if r.name == "middle")
    own_sigma = torch.tensor([(middle.lo + middle.hi) / 2])
    expected = deployed.denoise(x, own_sigma, text, timestep=300)  # the regime at a σ it owns
    with deployed.only_regime("middle") as forced:
        assert [r.name for r in forced.schedule.regimes] == ["middle"] and "early" not in forced.backend
        for sigma in (0.05, 0.95):  # σ of the late and early regimes; the timestep is held fixed
            assert torch.equal(forced.denoise(x, torch.tensor([sigma]), text, timestep=300), expected)
        assert forced.realised_density() == 1.0  # dense sparsity, fine FP8
    assert deployed.schedule is exported and deployed.backend == described
    assert all(core.schedule is exported for core in fps_cores(deployed.model))
    assert not torch.equal(deployed.denoise(x, torch.tensor([0.95]), text, timestep=300), expected)
    with pytest.raises(DeployError, match="'nope' is not in .*schedule.json: its regimes are"):
        with deployed.only_regime("nope"):
            pass
