"""GPU checks (run on the lent GPU: pytest -m gpu): the bf16-mixed training path and the model under autocast."""

from __future__ import annotations

import pytest
import torch

from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel
from fpsa_train.train import train
from tests.conftest import compose_train, make_regime

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_tiny_trains_bf16_mixed_on_gpu(tmp_path):
    metrics = train(compose_train(["+experiment=tiny", "data=synthetic", "fps=dense", "trainer.max_steps=80",
                                   "trainer.val_every_n_steps=40", "data.num_samples=128"], tmp_path))
    assert metrics["val/loss_end"] < 0.6 * metrics["val/loss_start"], metrics


def test_bf16_autocast_close_to_fp32_on_gpu():
    torch.manual_seed(0)
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=32,
                    token_order="tile", tile_shape=[6, 8, 8])
    with torch.device("cuda"):
        model = WanModel(cfg).eval()
        torch.nn.init.normal_(model.head.head.weight, std=0.05)
        x, t, c = torch.randn(1, 16, 7, 30, 52), torch.tensor([500.0]), torch.randn(1, 40, 64)
    with torch.no_grad():
        ref = model(x, t, c)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, c)
    assert out.dtype == torch.float32
    sqnr = 20 * torch.log10(ref.norm() / (ref - out).norm())
    assert sqnr > 30, f"bf16 autocast SQNR {sqnr:.1f} dB"


def test_fps_reference_on_gpu_matches_cpu():
    from fpsa_train.fps.reference import attention_tiles
    from fpsa_train.models.token_order import TokenLayout

    layout = TokenLayout((5, 6, 9), "tile", (2, 4, 4))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, layout.seq_len, 64, generator=g) for _ in range(3))
    for regime in (make_regime("window_topk", window=(1, 1, 1), topk=2, name="a"),
                   make_regime("dense", "subtile", name="b")):
        cpu, _ = attention_tiles(q, k, v, layout, regime)
        gpu, _ = attention_tiles(q.cuda(), k.cuda(), v.cuda(), layout, regime)
        sqnr = 20 * torch.log10(cpu.norm() / (cpu - gpu.cpu()).norm())
        assert sqnr > 60, f"{regime.name}: CPU vs GPU {sqnr:.1f} dB"


def test_tiny_trains_with_fps_on_gpu(tmp_path):
    metrics = train(compose_train(["+experiment=tiny", "data=synthetic", "fps=learned", "trainer.max_steps=60",
                                   "trainer.val_every_n_steps=30", "data.num_samples=128"], tmp_path))
    assert metrics["val/loss_end"] < 0.6 * metrics["val/loss_start"], metrics


def test_fps_picks_the_hopper_kernel_on_gpu():
    """fps.backend=auto: on H100/H200 both inference and training (its Triton backward) run the FP8 kernel."""
    from fpsa_kernels import unsupported_reason

    from fpsa_train.fps.schedule import FPSConfig, QuantConfig, RegimeConfig, Schedule, SparsityConfig
    from fpsa_train.fps.transform import apply_fps_attention
    from fpsa_train.models.config import WanConfig
    from fpsa_train.models.wan import WanModel

    if unsupported_reason(torch.zeros(1, device="cuda")) is not None:
        pytest.skip("not a Hopper GPU")
    cfg = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, freq_dim=32, text_len=16,
                    token_order="tile", tile_shape=[2, 4, 4])
    model = WanModel(cfg).cuda()
    regimes = [RegimeConfig("all", [0.0, 1.0], QuantConfig("tile"), SparsityConfig("window_topk", [1, 1, 1], 2))]
    apply_fps_attention(model, Schedule.from_config(FPSConfig(regimes=regimes), tuple(cfg.tile_shape)))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.1)  # zero-initialised in Wan
    x = torch.randn(1, cfg.in_dim, 5, 16, 16, device="cuda")
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda")
    t = torch.tensor([500.0], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, ctx, attn_kwargs={"sigma": t / 1000})
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert model.blocks[0].self_attn.core.last_backend == "kernel"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, ctx, attn_kwargs={"sigma": t / 1000}).float().pow(2).mean().backward()
    assert model.blocks[0].self_attn.core.last_backend == "kernel"
    grads = [p.grad for p in model.blocks[0].self_attn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
