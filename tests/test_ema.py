"""The EMA's warmup: a short run's average is not its initial weights, and warmup off keeps the plain decay."""

import pytest
import torch
from torch import nn

from fpsa_train.lit.ema import EMA


def _moved(value: float) -> nn.Linear:
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


@pytest.mark.parametrize("warmup, expected", [(True, 0.1 * 0.0 + 0.9 * 1.0), (False, 0.999 * 0.0 + 0.001 * 1.0)])
def test_first_update_weight(warmup, expected):
    model = _moved(0.0)
    ema = EMA(0.999, warmup=warmup).attach(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), expected))


def test_decay_ramps_to_its_cap():
    ema = EMA(0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(80) == pytest.approx(0.9)
    assert ema.decay_at(890) == pytest.approx(0.99)
    assert ema.decay_at(8_990) == pytest.approx(0.999) and ema.decay_at(100_000) == 0.999
    assert ema.decay_at(None) == 0.999 and EMA(0.999).decay_at(5) == 0.999


def test_short_run_forgets_the_initial_weights():
    """1,000 updates towards a fixed target: with warmup the initial weights keep < 1% of the average; without it
    they keep e^-1 ≈ 37% (the failure a from-scratch run exported after 1,000 steps would show)."""
    share = {}
    for warmup in (True, False):
        model = _moved(0.0)
        ema = EMA(0.999, warmup=warmup).attach(model)
        with torch.no_grad():
            model.weight.fill_(1.0)
        for step in range(1_000):
            ema.update(model, step)
        share[warmup] = 1.0 - ema.shadow["weight"][0, 0].item()  # what is left of the initial 0.0
    assert share[True] < 0.01
    assert share[False] == pytest.approx(0.999 ** 1_000, rel=1e-3)
