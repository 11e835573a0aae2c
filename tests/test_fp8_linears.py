"""FP8 linears (fpsa_train/fp8_linears.py): which Linears convert, torchao's per-row FP8 path run for real (on the CPU,
where torch implements `_scaled_mm`; on the GPU with the `gpu` marker), the errors that name what is missing, and the
opt-in flag through load_deploy, the sampler and evaluate.

Accuracy floor, derived: e4m3 keeps 3 mantissa bits, so round-to-nearest leaves an error uniform in ±2^-4 of the
value's binade; for values spread over a binade [1, 2) that is E[err²]/E[x²] = (2^-3)²/12 / (7/3), an SQNR of ~32.5 dB
per quantized operand (per-row scales put each row's largest value at 448, so rows of Gaussian-like values stay in the
normal range). A GEMM with both operands quantized adds the two noises: ~29.5 dB (28.8 dB measured for one Linear of
Gaussian data). A model's output sums many such errors through residual branches, which attenuates rather than
compounds them at these depths (45 dB measured on the tiny DiT); 25 dB is the floor: ~4 dB (2.5× noise power) under
one GEMM's own error, for Hopper's fast accumulation and error growth across blocks, and far above what a wrong scale
or a transposed weight gives (< 10 dB).
"""

from __future__ import annotations

import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fpsa_train.config import ConfigError, resolve
from fpsa_train.deploy import load_deploy
from fpsa_train.fp8_linears import FP8LinearsUnavailable, apply_fp8_linears, fp8_linear_names, linear_flops
from fpsa_train.fps.fp8 import sqnr_db
from fpsa_train.models.config import WAN_1_3B, WAN_14B, WanConfig
from fpsa_train.models.wan import WanModel
from tests.conftest import CONFIGS, KERNEL_SIZED, export_random

SQNR_FLOOR_DB = 25.0  # derived in the module docstring
TINY = dict(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64, freq_dim=32, token_order="tile",
            tile_shape=[2, 4, 4])  # configs/model/tiny.yaml
EXPECTED = [f"blocks.{i}.{m}" for i in range(2) for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                           "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")]


def _tiny_model() -> WanModel:
    """The tiny DiT with weights exactly representable in bf16 (as a bf16 deploy folder's), head non-zero."""
    torch.manual_seed(0)
    model = WanModel(WanConfig(**TINY)).eval()
    nn.init.normal_(model.head.head.weight, std=0.02)  # the published init zeroes it: outputs would be 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 3, 8, 16, generator=g), torch.randn(1, 5, 64, generator=g)
    return x.to(device), text.to(device), torch.tensor([500.0], device=device)


def _is_fp8(linear: nn.Linear) -> bool:
    return type(linear.weight.data) is not torch.Tensor


@pytest.fixture(scope="module")
def tiny_deploy(tmp_path_factory) -> str:
    return export_random(tmp_path_factory.mktemp("fp8"), ["+experiment=tiny", "data=synthetic"], name="tiny")


@pytest.fixture
def cpu_allowed(monkeypatch):
    """load_deploy / evaluate with fp8_linears on the CPU: the device gate lifted as `allow_cpu=True` lifts it."""
    import fpsa_train.fp8_linears as fp8

    real = fp8.check_device
    monkeypatch.setattr(fp8, "check_device", lambda device, allow_cpu=False: real(device, allow_cpu=True))


# ------------------------------------------------------------------------------------------------ the rule


def test_the_rule_picks_each_blocks_video_token_linears():
    model = WanModel(WanConfig(**TINY))
    assert fp8_linear_names(model) == EXPECTED  # 8 per block: self q/k/v/o, cross q/o, ffn.0, ffn.2
    left = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(EXPECTED)
    assert left == {"text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
                    "time_projection.1", "head.head", "blocks.0.cross_attn.k", "blocks.0.cross_attn.v",
                    "blocks.1.cross_attn.k", "blocks.1.cross_attn.v"}


def test_linears_whose_dims_are_not_multiples_of_16_are_left_and_a_model_with_none_is_refused():
    model = WanModel(WanConfig(**{**TINY, "dim": 72, "num_heads": 4}))  # 72 = 4 heads of 18: no _scaled_mm shape
    assert fp8_linear_names(model) == []
    with pytest.raises(ValueError, match=r"no Linear of WanModel matches the FP8 rule .*multiples of 16"):
        apply_fp8_linears(model, allow_cpu=True)


def test_flop_coverage_at_the_published_sizes():
    """The docstring's table: the share of the DiT's linear multiply-adds that run in FP8."""
    world_s = dict(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64, freq_dim=64)  # the proving ground
    for arch, tokens, share in ((WAN_1_3B, 21 * 30 * 52, 99.80), (WAN_14B, 21 * 45 * 80, 99.88),
                                (world_s, 5 * 16 * 16, 93.40)):
        flops = linear_flops(WanConfig(**arch), tokens)
        assert round(100 * flops["fp8"] / sum(flops.values()), 1 if arch is world_s else 2) == share
    # cross-check with the measurement: 14B-720p linears of a CFG-batch-2 step ≈ 3.6 PFLOP
    assert abs(2 * 2 * sum(linear_flops(WanConfig(**WAN_14B), 75600).values()) / 1e15 - 3.62) < 0.01


# --------------------------------------------------------------------------------------------- conversion


def test_cpu_without_allow_cpu_names_the_device_and_changes_nothing():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FP8LinearsUnavailable, match=r"compute capability >= 8\.9 .*the model is on cpu"):
        apply_fp8_linears(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not any(
        _is_fp8(m) for m in model.modules() if isinstance(m, nn.Linear))


def test_missing_torchao_is_named_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    model = _tiny_model()
    with pytest.raises(FP8LinearsUnavailable, match=r"need torchao >= 0\.18, which is not installed.*fpsa\[fp8\]"):
        apply_fp8_linears(model, allow_cpu=True)
    assert not any(_is_fp8(m) for m in model.modules() if isinstance(m, nn.Linear))


def test_conversion_runs_torchaos_per_row_path_on_the_cpu():
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor

    model, ref = _tiny_model(), _tiny_model()
    assert apply_fp8_linears(model, allow_cpu=True) == EXPECTED
    modules = dict(model.named_modules())
    for name in EXPECTED:
        w = modules[name].weight
        assert isinstance(w, Float8Tensor) and w.qdata.dtype == torch.float8_e4m3fn
        assert w.scale.shape == (w.shape[0], 1)  # one scale per output channel
    assert not any(_is_fp8(m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in EXPECTED)
    assert modules["head.head"].weight.dtype == torch.float32  # untouched
    x, text, t = _inputs()
    with torch.no_grad():
        db = sqnr_db(ref(x, t, text), model(x, t, text))
    print(f"tiny DiT, FP8 linears vs fp32: {db:.1f} dB")
    assert SQNR_FLOOR_DB < db < 80, f"SQNR {db:.1f} dB"  # quantized (not bit-equal), and close
    with pytest.raises(ValueError, match="FP8 already"):
        apply_fp8_linears(model, allow_cpu=True)


def test_one_linear_is_within_the_derived_error_and_keeps_autocasts_dtype():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    bf16 = nn.Linear(256, 512)
    with torch.no_grad():
        bf16.weight.copy_(bf16.weight.bfloat16().float())
        bf16.bias.copy_(bf16.bias.bfloat16().float())
    holder = nn.Module()
    holder.blocks = nn.ModuleList([nn.Module()])
    holder.blocks[0].ffn = nn.Sequential(nn.Linear(256, 512))
    holder.blocks[0].ffn[0].load_state_dict(bf16.state_dict())
    apply_fp8_linears(holder, allow_cpu=True)
    fp8 = holder.blocks[0].ffn[0]
    x = torch.randn(64, 256)
    with torch.no_grad():
        db = sqnr_db(bf16(x), fp8(x))
        assert fp8(x).dtype == torch.float32  # no autocast: the input's dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16 Linear under autocast: bf16 out
            assert fp8(x).dtype == bf16(x).dtype == torch.bfloat16
    print(f"one Linear (Gaussian input), e4m3 x e4m3 per-row vs fp32: {db:.1f} dB")
    assert 27 < db < 32, f"{db:.1f} dB: two e4m3 operands give ~29.5 dB (module docstring)"


# ------------------------------------------------------------------------------------------- the opt-in flag


def test_load_deploy_refuses_fp8_linears_on_the_cpu_before_reading_weights(tiny_deploy, monkeypatch):
    def no_read(*args, **kwargs):
        raise AssertionError("weights read before the FP8 check")

    monkeypatch.setattr("fpsa_train.models.checkpoint.load_wan_weights", no_read)
    with pytest.raises(FP8LinearsUnavailable, match="the model is on cpu"):
        load_deploy(tiny_deploy, fp8_linears=True)


def test_load_deploy_default_is_bf16_linears_and_the_flag_converts(tiny_deploy, cpu_allowed):
    pytest.importorskip("torchao")
    plain, off = load_deploy(tiny_deploy), load_deploy(tiny_deploy, fp8_linears=False)
    assert not any(_is_fp8(m) or m._forward_pre_hooks for m in plain.model.modules() if isinstance(m, nn.Linear))
    on = load_deploy(tiny_deploy, fp8_linears=True)
    converted = [n for n, m in on.model.named_modules() if isinstance(m, nn.Linear) and _is_fp8(m)]
    assert converted == EXPECTED
    x, text, _ = _inputs()
    sigma = torch.tensor([0.5])
    expected = plain.denoise(x, sigma, text)
    assert torch.equal(off.denoise(x, sigma, text), expected)  # default off: bit-identical
    db = sqnr_db(expected, on.denoise(x, sigma, text))
    assert SQNR_FLOOR_DB < db < 80, f"SQNR {db:.1f} dB"


def test_a_misspelled_fp8_linears_key_is_named_at_compose_time():
    from fpsa_train.sample import SampleConfig

    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        cfg = resolve(compose(config_name="sample", overrides=["deploy=d", "prompt=p", "fp8_linears=true"]))
        assert isinstance(cfg, SampleConfig) and cfg.fp8_linears is True
        with pytest.raises(ConfigError, match="did you mean `fp8_linears`"):
            resolve(compose(config_name="sample", overrides=["deploy=d", "prompt=p", "+fp8_linear=true"]))


def test_evaluate_adds_an_fp8_row_per_candidate(tiny_deploy, tmp_path):
    from fpsa_train.eval.config import EvaluateConfig
    from fpsa_train.eval.runner import _inputs as inputs_of
    from fpsa_train.eval.runner import build_variants, evaluate

    with initialize_config_dir(config_dir=str(CONFIGS / "tools"), version_base="1.3"):
        assert resolve(compose(config_name="evaluate", overrides=["candidates=[d]"])).fp8_linears is False
        cfg = resolve(compose(config_name="evaluate", overrides=[f"candidates=[{tiny_deploy}]", "fp8_linears=true",
                                                                  f"reference={tiny_deploy}"]))
    variants = build_variants(cfg)
    assert [(v.key, v.fp8_linears) for v in variants] == [("reference", False), ("tiny", False), ("tiny.fp8", True)]
    assert variants[2].label.endswith(" + FP8 linears") and variants[2].attention == variants[1].attention
    args = ("p", 0, (32, 32, 5), str(tmp_path), torch.device("cpu"), ["p"])
    assert "fp8_linears" not in inputs_of(cfg, variants[1], *args)  # saved videos of earlier runs keep their keys
    assert inputs_of(cfg, variants[2], *args)["fp8_linears"] is True
    with pytest.raises(FP8LinearsUnavailable, match="the model is on cpu"):  # before anything is sampled
        evaluate(EvaluateConfig(candidates=[tiny_deploy], fp8_linears=True, device="cpu", out=str(tmp_path / "e")))
    assert not (tmp_path / "e").exists()


def test_evaluate_measures_fp8_linears_against_the_same_weights(tiny_deploy, tiny_components, tmp_path, cpu_allowed):
    """`reference=<candidate>`: the candidate's own row is the reference's video (copied), the `.fp8` row differs by
    the FP8 linears alone."""
    pytest.importorskip("torchao")
    from fpsa_train.eval.config import EvaluateConfig
    from fpsa_train.eval.runner import evaluate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left quickly on a dark blue background\n")
    results = evaluate(EvaluateConfig(candidates=[tiny_deploy], reference=tiny_deploy, fp8_linears=True,
                                      prompts=str(prompts), seeds=[7], steps=2, components=str(tiny_components),
                                      out=str(tmp_path / "eval"), device="cpu", height=32, width=64, frames=5,
                                      vbench=False))
    rows = {v["key"]: v for v in results["variants"]}
    assert set(rows) == {"reference", "tiny", "tiny.fp8"} and results["settings"]["fp8_linears"] is True
    assert rows["tiny"]["psnr"] == results["psnr_cap_db"] and not rows["tiny"]["fp8_linears"]
    assert rows["tiny.fp8"]["fp8_linears"] and rows["tiny.fp8"]["regime"].endswith("+ FP8 linears")
    assert 20 < rows["tiny.fp8"]["psnr"] < results["psnr_cap_db"], rows["tiny.fp8"]["psnr"]


# --------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_fp8_linears_on_the_gpu_stay_within_the_floor_and_run_scaled_mm(tmp_path, monkeypatch):
    """A small Wan DiT (head_dim 128, 512 tokens) exported and loaded on CUDA in bf16 under autocast, as deployed:
    FP8 linears against bf16 linears, dense SDPA in both so that the linears are the only difference; then with the
    FPS schedule (the Hopper kernel) on top. Run on the H200 before a quality claim."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU of compute capability >= 8.9")
    pytest.importorskip("torchao")
    from fpsa_train.fps.transform import fps_cores

    folder = export_random(tmp_path, KERNEL_SIZED, name="tiny")
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 16, 32, generator=g).cuda()  # CFG batch 2
    text = torch.randn(2, 512, 64, generator=g).cuda()
    bf16 = load_deploy(folder, device="cuda", fps=False)
    fp8 = load_deploy(folder, device="cuda", fps=False, fp8_linears=True)
    n = len(fp8_linear_names(bf16.model))
    for sigma in (0.95, 0.5, 0.1):
        ref, got = bf16.denoise(x, sigma, text), fp8.denoise(x, sigma, text)
        db = sqnr_db(ref, got)
        print(f"σ={sigma}: FP8 linears vs bf16 linears, SQNR {db:.1f} dB")
        assert torch.isfinite(got).all() and db > SQNR_FLOOR_DB, f"σ={sigma}: SQNR {db:.1f} dB"
    from torchao.utils import _is_mslk_available

    assert _is_mslk_available() or len(calls) >= 3 * n, f"{len(calls)} torch._scaled_mm calls for {n} FP8 linears"
    q = fp8.model.blocks[0].self_attn.q
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert q(torch.randn(4, 256, device="cuda")).dtype == torch.bfloat16
    both = load_deploy(folder, device="cuda", fp8_linears=True)
    fps = load_deploy(folder, device="cuda")
    for regime in both.schedule.regimes:
        sigma = (regime.lo + regime.hi) / 2
        got, ref = both.denoise(x, sigma, text), fps.denoise(x, sigma, text)
        assert {c.last_backend for c in fps_cores(both.model)} == {"kernel"}, regime.name
        print(f"{regime.name}: FPS + FP8 linears vs FPS + bf16 linears, SQNR {sqnr_db(ref, got):.1f} dB")
        assert torch.isfinite(got).all()
