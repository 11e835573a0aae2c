"""FPS attention in diffusers (fpsa_train/diffusers_fps.py): equal to our DiT's FPS attention, runs in WanPipeline.

The oracle is our WanModel with `apply_fps_attention`, loaded with the same weights (models/state_dict.py). The two
models agree to fp32 rounding (tests/models/test_wan_parity.py); with FP8 in the loop such rounding differences
occasionally push a value across an e4m3 rounding boundary, so the quantized regimes' tolerance is derived from
the number of such flips, counted on the attention cores' inputs (see `flip_bound_db`).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from fpsa_train.diffusers_fps import (FPSAttnProcessor, FPSContext, apply_fps_attention_diffusers, fps_cores_diffusers,
                                      remove_fps_attention_diffusers)
from fpsa_train.fps.fp8 import quantize_qk, quantize_v, round_e4m3, sqnr_db
from fpsa_train.fps.schedule import FPSConfig, QuantConfig, RegimeConfig, Schedule, ScheduleError, SparsityConfig
from fpsa_train.fps.transform import apply_fps_attention, fps_cores
from fpsa_train.models.config import WanConfig
from fpsa_train.models.state_dict import to_diffusers
from fpsa_train.models.wan import WanModel

TILE = (2, 2, 2)
CFG = WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=16, text_len=16,
                token_order="tile", tile_shape=list(TILE))
LATENT = (2, 16, 3, 10, 14)  # grid 3×5×7 in tokens: the 2×2×2 tile leaves partial edge tiles (tile grid 2×3×4)


def fps_schedule(late: SparsityConfig | None = None) -> Schedule:
    """configs/fps/default.yaml's shape, windows scaled to the 2×3×4 tile grid so that tiles are dropped: early =
    coarse scales + a window spanning t and h but one tile in w (as (6,6,1) at 480p); middle = fine scales, dense;
    late = per-tile scales + a narrower window ∪ top-2."""
    late = late or SparsityConfig("window_topk", [1, 3, 1], 2)
    return Schedule.from_config(FPSConfig(regimes=[
        RegimeConfig("early", [0.9, 1.0], QuantConfig("tiles", [2, 2, 2]), SparsityConfig("window", [2, 3, 1])),
        RegimeConfig("middle", [0.4, 0.9], QuantConfig("subtile", [2, 2, 2]), SparsityConfig("dense")),
        RegimeConfig("late", [0.0, 0.4], QuantConfig("tile"), late),
    ]), TILE)


def unquantized(schedule: Schedule) -> Schedule:
    return Schedule(tuple(dataclasses.replace(r, quant=None) for r in schedule.regimes))


def diffusers_twin(cfg: WanConfig, weights: dict[str, torch.Tensor]) -> WanTransformer3DModel:
    """diffusers' model with our DiT's weights (`weights` in our key names, without FPS cores)."""
    theirs = WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps).eval()
    theirs.load_state_dict(to_diffusers(weights), strict=True)
    return theirs


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = WanModel(CFG).eval()
    with torch.no_grad():  # the published init zeroes the head; random weights exercise every path
        for p in ours.parameters():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(*LATENT, generator=g), torch.randn(LATENT[0], CFG.text_len, CFG.text_dim, generator=g)
    return ours, diffusers_twin(CFG, ours.state_dict()), x, text


def record_core_inputs(cores, records: list) -> list:
    """Forward pre-hooks appending each core call's (q, k, v, layout, sigma) to `records`; returns the handles."""
    def hook(module, args, kwargs):
        records.append((*(a.detach().clone() for a in args[:3]), args[3], kwargs["sigma"]))

    return [c.register_forward_pre_hook(hook, with_kwargs=True) for c in cores]


def fp8_codes(x: torch.Tensor, layout, quant, is_v: bool) -> torch.Tensor:
    """The e4m3 values that FPS attention's quantization gives x (one sample, (1, H, L, D))."""
    scale = quantize_v(x)[1] if is_v else quantize_qk(x, layout, quant)[1]
    return round_e4m3(x.float() / scale)


def count_flips(schedule: Schedule, ours_calls, their_calls) -> tuple[int, int]:
    """(flipped e4m3 roundings, quantized elements) over q, k, v of every layer and sample."""
    flips = total = 0
    for (*ours_qkv, layout, sigma), (*their_qkv, _, _) in zip(ours_calls, their_calls, strict=True):
        sigma = torch.as_tensor(sigma).reshape(-1).expand(ours_qkv[0].shape[0])
        for b, r in enumerate(schedule.regime_index(sigma).tolist()):
            quant = schedule.regimes[r].quant
            if quant is None:
                continue
            for i, (a, t) in enumerate(zip(ours_qkv, their_qkv)):
                ca, ct = (fp8_codes(x[b:b + 1], layout, quant, is_v=i == 2) for x in (a, t))
                flips += int((ca != ct).sum())
                total += ca.numel()
    return flips, total


def flip_bound_db(quant_sqnr_db: float, flips: int, total: int) -> float:
    """Lowest SQNR that fp32 rounding differences can explain once FP8 rounding is in the loop.

    Round-to-nearest leaves each quantized element an error uniform in ±s/2 (power s²/12, s its e4m3 step);
    together these N errors make the regime's quantization error, whose SQNR `quant_sqnr_db` we measure (FPS
    against the same schedule unquantized). An input that differs by an ulp from the other implementation's
    and sits on a rounding boundary rounds to the neighbouring e4m3 value: an error of a whole step s, 12× the
    average rounding error's power. With F of the N elements flipped, the implementations differ by ≈ 12·F/N of
    the quantization noise power: SQNR ≥ quant_sqnr_db + 10·log10(N / (12·F)). F counts q/k/v only; P's roundings
    (inside the core) are taken to flip at the same rate, which leaves F/N unchanged; F + 1 keeps one flip in P
    when none shows in q/k/v. The 10 dB allowance covers the spread of how much one element moves the output
    (a flip in a large q entry, or one that the next layer's top-k selection reacts to).
    """
    return quant_sqnr_db + 10 * math.log10(total / (12 * (flips + 1))) - 10.0


def report(name: str, ref: torch.Tensor, out: torch.Tensor, floor: float | None = None) -> str:
    diff = (ref - out).abs()
    return (f"{name}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, SQNR {sqnr_db(ref, out):.1f} dB"
            + ("" if floor is None else f" (floor {floor:.1f} dB)"))


def run_ours(ours: WanModel, schedule: Schedule, x, text, sigma, prepare=None, record: list | None = None):
    """Our DiT with FPS attention for `schedule` (`prepare(ours)` after the swap; `record` collects core inputs)."""
    apply_fps_attention(ours, schedule, backend="reference")
    if prepare is not None:
        prepare(ours)
    handles = [] if record is None else record_core_inputs(fps_cores(ours), record)
    with torch.no_grad():
        out = ours(x, sigma * 1000, text, attn_kwargs={"sigma": sigma})
    for h in handles:
        h.remove()
    return out


def run_theirs(theirs, schedule: Schedule, x, text, sigma, tile=TILE, selector_state=None,
               record: list | None = None) -> torch.Tensor:
    apply_fps_attention_diffusers(theirs, schedule, tile, backend="reference", selector_state=selector_state)
    handles = [] if record is None else record_core_inputs(fps_cores_diffusers(theirs), record)
    with torch.no_grad():
        out = theirs(x, sigma * 1000, text).sample
    for h in handles:
        h.remove()
    return out


def core_state(ours: WanModel) -> dict[str, torch.Tensor] | None:
    """Our cores' state (learned selectors) in our key names, as apply_fps_attention_diffusers takes it."""
    return {k: v for k, v in ours.state_dict().items() if ".self_attn.core." in k} or None


def compare(pair, schedule: Schedule, sigma: torch.Tensor, prepare=None):
    """Our DiT and its diffusers twin, each with FPS attention, on the same input:
    (ref, out, floor, quantization SQNR of the regimes, details)."""
    ours, theirs, x, text = pair
    quant_ref = run_ours(ours, unquantized(schedule), x, text, sigma, prepare)
    ours_calls, their_calls = [], []
    ref = run_ours(ours, schedule, x, text, sigma, prepare, record=ours_calls)
    out = run_theirs(theirs, schedule, x, text, sigma, selector_state=core_state(ours), record=their_calls)
    quant_db = sqnr_db(ref, quant_ref)
    flips, total = count_flips(schedule, ours_calls, their_calls)
    floor = flip_bound_db(quant_db, flips, total)
    return ref, out, floor, quant_db, f"{flips}/{total} flips, quantization {quant_db:.1f} dB"


def test_dense_unquantized_processor_matches_our_model_to_fp32_rounding(pair):
    """The fp32 baseline: one dense unquantized regime through the processor (tile-major permutation, RoPE as
    diffusers applies it, the reference core) against our DiT. Measured max 2.0e-5, mean 2.8e-6, relative 1.8e-6
    (115 dB); the bound is the whole-model fp32 parity bound, 1e-5 relative (tests/models/test_wan_parity.py)."""
    ours, theirs, x, text = pair
    dense = Schedule.from_config(FPSConfig(), TILE)
    sigma = torch.tensor([0.95, 0.2])
    ref = run_ours(ours, dense, x, text, sigma)
    out = run_theirs(theirs, dense, x, text, sigma)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel <= 1e-5, report("dense", ref, out) + f", relative {rel:.3g}"


@pytest.mark.parametrize("sigma", [[0.95, 0.95], [0.6, 0.6], [0.2, 0.2], [0.95, 0.2]],
                         ids=["early", "middle", "late", "early+late"])
def test_processor_matches_our_fps_attention(pair, sigma):
    ours, theirs, x, text = pair
    schedule, sigma = fps_schedule(), torch.tensor(sigma)
    ref, out, floor, quant_db, details = compare(pair, schedule, sigma)
    assert sqnr_db(ref, out) >= floor, report("diffusers FPS vs ours", ref, out, floor) + "; " + details
    # Not vacuous: both ran the same regimes with the same tile selection, dropped tiles where they should, and
    # the floor would catch a processor that skipped the sparsity or the FP8 rounding (it sits ≥ 10 dB above both
    # effects, FPS vs dense attention and FPS vs FPS unquantized).
    density = [c.last_density for c in fps_cores_diffusers(theirs)]
    assert density == [c.last_density for c in fps_cores(ours)]
    expected = {schedule.regime_for(float(s)).name for s in sigma}
    assert all(set(d) == expected and all(d[n] < 1 for n in expected - {"middle"}) for d in density), density
    fps_db = sqnr_db(run_ours(ours, Schedule.from_config(FPSConfig(), TILE), x, text, sigma), ref)
    assert floor >= max(fps_db, quant_db) + 10, f"floor {floor:.1f} dB; FPS vs dense {fps_db:.1f} dB; " + details


def test_wrong_tile_layout_fails_the_floor(pair):
    """The floor separates a real mistake: the processor with another tile shape (2×2×4) is far below it."""
    ours, theirs, x, text = pair
    schedule, sigma = fps_schedule(), torch.tensor([0.2, 0.2])
    ref, _, floor, _, details = compare(pair, schedule, sigma)
    wrong = run_theirs(theirs, schedule, x, text, sigma, tile=(2, 2, 4))
    assert sqnr_db(ref, wrong) < floor, report("tile 2×2×4", ref, wrong, floor) + "; " + details


def test_learned_selectors_load_per_layer(pair):
    ours, theirs, x, text = pair
    schedule = fps_schedule(late=SparsityConfig("learned", [1, 1, 1], target_density=0.4))

    def trained(model: WanModel) -> None:  # distinct thresholds per layer and head, as training leaves them
        with torch.no_grad():
            for i, core in enumerate(fps_cores(model)):
                core.selectors["late"].bias.copy_(torch.linspace(-1.0, 1.0, CFG.num_heads) + i)

    sigma = torch.tensor([0.2, 0.2])
    ref, out, floor, _, details = compare(pair, schedule, sigma, prepare=trained)
    assert sqnr_db(ref, out) >= floor, report("learned", ref, out, floor) + "; " + details
    density = [c.last_density["late"] for c in fps_cores_diffusers(theirs)]
    assert density == [c.last_density["late"] for c in fps_cores(ours)] and density[0] != density[1], density

    state = core_state(ours)
    assert sorted(state) == [f"blocks.{i}.self_attn.core.selectors.late.bias" for i in range(2)]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.self_attn.core.selectors.late.bias'\]"):
        apply_fps_attention_diffusers(theirs, schedule, TILE, selector_state={"blocks.0.self_attn.core.selectors"
                                                                              ".late.bias": state[sorted(state)[0]]})
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.self_attn.q.weight'\]"):
        apply_fps_attention_diffusers(theirs, schedule, TILE,
                                      selector_state={**state, "blocks.0.self_attn.q.weight": torch.zeros(1)})


def test_integer_timesteps_pick_the_regime_of_their_true_sigma(pair):
    """Samplers floor t = 1000σ to int64: σ = 0.9001 arrives as t = 900 and must stay early, σ = 0.8999 as 899."""
    _, theirs, x, text = pair
    apply_fps_attention_diffusers(theirs, fps_schedule(), TILE, backend="reference")
    with torch.no_grad():
        theirs(x, torch.tensor([900, 899]), text)
    assert set(fps_cores_diffusers(theirs)[0].last_density) == {"early", "middle"}
    context = FPSContext(fps_schedule(), TILE, (1, 2, 2), num_train_timesteps=1000)
    context.begin(x, torch.tensor(900))  # a scalar timestep serves the whole batch (diffusers itself wants (B,))
    assert context.sigma.tolist() == [torch.tensor(0.9).item()] * 2 and context.layout.grid == (3, 5, 7)


def test_apply_keeps_diffusers_state_dict_and_remove_restores_dense(pair):
    ours, _, x, text = pair
    theirs = diffusers_twin(CFG, {k: v for k, v in ours.state_dict().items() if ".self_attn.core." not in k})
    keys, t = list(theirs.state_dict()), torch.tensor([950.0, 200.0])
    with torch.no_grad():
        dense = theirs(x, t, text).sample
        apply_fps_attention_diffusers(theirs, fps_schedule(), TILE)
        assert list(theirs.state_dict()) == keys  # save_pretrained / from_pretrained see diffusers' keys only
        assert all(isinstance(b.attn1.processor, FPSAttnProcessor) for b in theirs.blocks)
        assert all(type(b.attn2.processor) is WanAttnProcessor for b in theirs.blocks)
        fps = theirs(x, t, text).sample
        remove_fps_attention_diffusers(theirs)
        assert all(type(b.attn1.processor) is WanAttnProcessor for b in theirs.blocks)
        assert torch.equal(theirs(x, t, text).sample, dense) and sqnr_db(dense, fps) < 40


def test_errors(pair):
    _, theirs, x, text = pair
    schedule = fps_schedule()
    with pytest.raises(ScheduleError, match=r"'middle'.*2 does not divide the tile \(3, 2, 2\) on axis 't'"):
        apply_fps_attention_diffusers(theirs, schedule, (3, 2, 2))
    with pytest.raises(ScheduleError, match="expected three positive integers"):
        apply_fps_attention_diffusers(theirs, schedule, (2, 2))
    with pytest.raises(TypeError, match="expects a diffusers WanTransformer3DModel"):
        apply_fps_attention_diffusers(torch.nn.Linear(2, 2), schedule, TILE)

    apply_fps_attention_diffusers(theirs, schedule, TILE)
    attn = theirs.blocks[0].attn1
    hidden = torch.randn(2, 105, CFG.dim)
    rope = theirs.rope(x)
    with pytest.raises(RuntimeError, match="outside a transformer forward"):
        attn(hidden, None, None, rope)  # the processor alone has no σ and no token grid
    with torch.no_grad():
        theirs(x, torch.tensor([950.0, 200.0]), text)
    with pytest.raises(RuntimeError, match="outside a transformer forward"):
        attn(hidden, None, None, rope)  # the call's state is cleared when it returns
    with pytest.raises(ValueError, match="is for self-attention"):
        attn.processor(attn, hidden, text, None, rope)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"), torch.no_grad():
        theirs(x, torch.tensor([950.0, 200.0, 100.0]), text)
    theirs.enable_gradient_checkpointing()
    try:
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            theirs(x, torch.tensor([950.0, 200.0]), text)
    finally:
        theirs.disable_gradient_checkpointing()


def test_wan_pipeline_runs_with_fps_attention(tmp_path):
    """diffusers' WanPipeline end to end on tiny local components (untrained VAE; ftfy and accelerate are not
    needed: the pipeline uses ftfy only when installed, and accelerate only for offloading)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from fpsa_train.data.tiny_models import TINY_TEXT_DIM, build_tiny_wan_components, load_components

    build_tiny_wan_components(tmp_path / "components", None, vae_steps=1)
    vae, text_encoder, tokenizer = load_components(tmp_path / "components")
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=TINY_TEXT_DIM, freq_dim=16,
                                        ffn_dim=64, num_layers=2).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    schedule = fps_schedule()
    apply_fps_attention_diffusers(transformer, schedule, TILE)
    calls: list[dict[str, float]] = []  # realised density per regime of each transformer call, in layer 0
    core = fps_cores_diffusers(transformer)[0]
    core.register_forward_hook(lambda module, args, out: calls.append(dict(module.last_density)))
    steps: list[int] = []

    def on_step_end(pipeline, i, t, callback_kwargs):
        steps.append(int(t))
        return callback_kwargs

    # 64×64×5 frames → latent 16×2×8×8 (VAE 4× time, 8× space) → token grid 2×4×4, tile grid 1×2×2
    video = pipe("a red circle moving left", num_inference_steps=2, height=64, width=64, num_frames=5,
                 output_type="np", generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end)
    assert video.frames.shape == (1, 5, 64, 64, 3) and torch.isfinite(torch.as_tensor(video.frames)).all()
    assert steps == [999, 750]  # flow UniPC, 2 steps, shift 3: σ 0.999 (early) and 0.750 (middle)
    expected = [[schedule.regime_for(t / 1000).name] for t in steps for _ in range(2)]  # CFG: cond, then uncond
    assert [list(c) for c in calls] == expected == [["early"], ["early"], ["middle"], ["middle"]]
    assert calls[0]["early"] == 0.5 and calls[2]["middle"] == 1.0  # window 2×3×1 on the 1×2×2 tile grid: half
    assert core.last_backend == "reference"


def test_diffusers_export_loads_with_fps_attention_and_matches_the_deploy_runtime(trained_checkpoint, tmp_path):
    """A diffusers user's path: our diffusers-format export (learned selectors included) → `load_fps_transformer` →
    the velocity of our own deploy runtime, per regime (fp32 on CPU)."""
    from fpsa_train.deploy import DeployError, load_deploy
    from fpsa_train.diffusers_fps import load_fps_transformer
    from fpsa_train.export import ExportConfig, export

    out = export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / "d"), key_format="diffusers"))
    transformer = load_fps_transformer(out["out"], backend="reference")
    deployed = load_deploy(out["out"], backend="reference")
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 16, 3, 8, 16, generator=g), torch.randn(2, 512, 64, generator=g)
    for regime in deployed.schedule.regimes:
        sigma = torch.full((2,), (regime.lo + regime.hi) / 2)
        ours_calls, their_calls = [], []
        handles = record_core_inputs(fps_cores(deployed.model), ours_calls)
        handles += record_core_inputs(fps_cores_diffusers(transformer), their_calls)
        ref = deployed.denoise(x, sigma, text)
        with torch.no_grad():
            got = transformer(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=text).sample
        for h in handles:
            h.remove()
        # Without flipped e4m3 roundings the two agree to fp32 rounding (the dense baseline: relative 1e-5, i.e.
        # 100 dB); with F flips, `flip_bound_db` from a conservative 25 dB for the regimes' quantization SQNR (e4m3
        # has 3 mantissa bits: ~35 dB per element; measured 39–54 dB at the model output above). Measured here:
        # late 1 flip of 147456, 105.6 dB; middle 0 flips, 136.2 dB; early 1 flip, 115.1 dB.
        flips, total = count_flips(deployed.schedule, ours_calls, their_calls)
        floor = 100.0 if flips == 0 else flip_bound_db(25.0, flips, total)
        assert sqnr_db(ref, got) >= floor, report(regime.name, ref, got, floor) + f" ({flips}/{total} flips)"
    assert {n for c in fps_cores_diffusers(transformer) for n in c.last_density} == {regime.name}  # it ran
    (tmp_path / "orig").mkdir()
    original = export(ExportConfig(checkpoint=str(trained_checkpoint), out=str(tmp_path / "orig" / "d")))
    with pytest.raises(DeployError, match="key_format=diffusers"):
        load_fps_transformer(original["out"])
