"""`fpsa::attention` (fps/op.py) and torch.compile of a DiT with FPS attention, on CPU (Triton's interpreter).

The op must be the direct `fps_attention` call bit for bit, its fake implementation must describe the real outputs,
and a DiT whose regime is chosen per step (`attn_kwargs["regime"]`) must compile into one graph per regime, with no
graph break, computing exactly what the eager model does (aot_eager runs the traced graph op by op, so equality is
exact; Inductor's fused kernels are compared on the GPU in tests/test_compile_gpu.py).
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from fpsa_train.fps.masks import TileMask
from fpsa_train.fps.op import fps_attention_op, regime_of_spec, regime_spec
from fpsa_train.fps.reference import select_tiles
from fpsa_train.fps.schedule import FPSConfig, QuantConfig, RegimeConfig, Schedule, ScheduleError, SparsityConfig
from fpsa_train.fps.transform import apply_fps_attention, batch_regime, graph_breaks, realised_density
from fpsa_train.models.config import WanConfig
from fpsa_train.models.token_order import TokenLayout
from fpsa_train.models.wan import WanModel

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("CPU interpreter tests (the GPU runs tests/test_compile_gpu.py)", allow_module_level=True)

TILE = (2, 4, 4)
LAYOUT = TokenLayout((3, 4, 8), "tile", TILE)  # 96 tokens, 2×1×2 tiles: two of them partial in t
# head_dim 64 (the kernel's smallest); latents (3, 8, 16) patchify to LAYOUT's grid
CFG = WanConfig(dim=128, ffn_dim=128, num_heads=2, num_layers=1, text_dim=16, freq_dim=16, text_len=8,
                token_order="tile", tile_shape=list(TILE))
REGIMES = {  # one of each way the op gets its mask
    "dense": RegimeConfig("dense", [0.0, 1.0], QuantConfig("subtile", [2, 2, 2]), SparsityConfig("dense")),
    "window": RegimeConfig("window", [0.0, 1.0], QuantConfig("tiles", [2, 2, 2]),
                           SparsityConfig("window", [1, 1, 1])),
    "window_topk": RegimeConfig("window_topk", [0.0, 1.0], QuantConfig("tile"),
                                SparsityConfig("window_topk", [1, 1, 1], topk=2)),
    "topk": RegimeConfig("topk", [0.0, 1.0], QuantConfig("token"), SparsityConfig("topk", topk_fraction=0.5)),
    "learned": RegimeConfig("learned", [0.0, 1.0], QuantConfig("tile"),
                            SparsityConfig("learned", target_density=0.5)),
}


def regime(name: str):
    return Schedule.from_config(FPSConfig(regimes=[REGIMES[name]]), TILE).regimes[0]


def schedule() -> Schedule:
    """Three steps' regimes: a window (static plan), dense with fine scales, window ∪ top-k (mask from q, k)."""
    return Schedule.from_config(FPSConfig(regimes=[
        dataclasses.replace(REGIMES["window_topk"], name="late", sigma=[0.0, 0.4]),
        dataclasses.replace(REGIMES["dense"], name="middle", sigma=[0.4, 0.9]),
        dataclasses.replace(REGIMES["window"], name="early", sigma=[0.9, 1.0]),
    ]), TILE)


def qkv(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 2, LAYOUT.seq_len, 64, generator=g).to(torch.bfloat16) for _ in range(3)]


def tiny_dit(backend="kernel", kernel_forward="triton") -> WanModel:
    torch.manual_seed(0)
    model = apply_fps_attention(WanModel(CFG).eval(), schedule(), backend=backend, kernel_forward=kernel_forward)
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.1)  # zero-initialised in Wan: the output would be 0
    return model


def dit_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, CFG.in_dim, 3, 8, 16, generator=g), torch.randn(2, CFG.text_len, CFG.text_dim, generator=g)


def test_regime_spec_round_trips():
    for name in REGIMES:
        r = regime(name)
        assert regime_of_spec(regime_spec(r), TILE) == r
    with pytest.raises(ValueError, match="not JSON.*regime_spec"):
        regime_of_spec("early", TILE)
    with pytest.raises(ScheduleError, match="pattern='nope'"):
        regime_of_spec(regime_spec(regime("dense")).replace('"dense"', '"nope"'), TILE)


@pytest.mark.parametrize("name", list(REGIMES))
def test_op_is_the_direct_call_bit_for_bit(name):
    """The op's output and lse equal `fps_attention`'s called directly: with no mask (the regime selects its own),
    or for a learned regime with its selector's mask (here a fixed one); its density is the mask's."""
    from fpsa_train.fps.kernel import fps_attention

    r = regime(name)
    q, k, v = qkv()
    keep, mask = None, None
    if r.pattern == "learned":
        n = len(LAYOUT.tile_sizes())
        keep = (torch.rand(2, 2, n, n, generator=torch.Generator().manual_seed(2)) < 0.5) | torch.eye(n, dtype=bool)
        mask = TileMask.from_dense(keep)
    out, lse = fps_attention(q, k, v, LAYOUT, r, mask)
    got, got_lse, density = fps_attention_op(q, k, v, LAYOUT, r, keep)
    assert torch.equal(got, out) and torch.equal(got_lse, lse)
    expected = (mask if mask is not None else select_tiles(q, k, LAYOUT, r).mask).density().mean()
    assert density.dtype == torch.float32 and density.shape == () and torch.allclose(density, expected, rtol=1e-6)


def test_fake_impl_describes_the_real_outputs():
    """opcheck (schema, fake tensor against the real outputs, the missing autograd registration being an error
    rather than a silent wrong gradient, AOT dispatch), and the fake's shapes, dtypes and strides against the real
    outputs for a static and a dynamic mask."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = qkv(b=1)

    def args(name):
        return q, k, v, None, list(LAYOUT.grid), list(LAYOUT.tile_shape), regime_spec(regime(name))

    torch.library.opcheck(torch.ops.fpsa.attention.default, args("window_topk"))
    torch.library.opcheck(torch.ops.fpsa.attention.default, (*args("dense"), 0, "triton"))  # `forward` spelled out
    for name in ("window_topk", "dense"):
        real = torch.ops.fpsa.attention(*args(name))
        for forward in ("triton", "gluon"):  # the fake runs no kernel: the Gluon forward's outputs are described too
            with FakeTensorMode() as mode:
                fake = torch.ops.fpsa.attention(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                  for a in args(name)), 0, forward)
            for f, r in zip(fake, real):
                assert (f.shape, f.dtype, f.stride(), f.device) == (r.shape, r.dtype, r.stride(), r.device)
    assert [t.dtype for t in real] == [torch.bfloat16, torch.float32, torch.float32]
    assert real[0].shape == q.shape and real[1].shape == q.shape[:3] and real[2].shape == ()


def test_op_passes_forward_to_the_kernel():
    """`forward` reaches fps_attention: "gluon" runs the Gluon forward, which has no CPU interpreter and says so;
    "triton" is the default, bit for bit."""
    q, k, v = qkv(b=1)
    for name in ("dense", "topk"):  # a static plan and a mask selected in the op
        with pytest.raises(ValueError, match="no CPU interpreter"):
            fps_attention_op(q, k, v, LAYOUT, regime(name), forward="gluon")
        out, lse, _ = fps_attention_op(q, k, v, LAYOUT, regime(name))
        got, got_lse, _ = fps_attention_op(q, k, v, LAYOUT, regime(name), forward="triton")
        assert torch.equal(got, out) and torch.equal(got_lse, lse)


def test_kernel_forward_reaches_the_op_in_inference_only():
    """apply_fps_attention(kernel_forward="gluon"): an inference forward reaches the Gluon forward (no CPU
    interpreter), in every regime of the schedule; a call that needs gradients runs the Triton forward as before.
    A bad value is refused before any block is touched, naming it and the choices."""
    x, text = dit_inputs()
    model = tiny_dit(kernel_forward="gluon")
    assert {c.kernel_forward for c in (b.self_attn.core for b in model.blocks)} == {"gluon"}
    for name in ("late", "middle", "early"):
        with torch.no_grad(), pytest.raises(ValueError, match="no CPU interpreter"):
            model(x, torch.full((2,), 500.0), text, attn_kwargs={"regime": name})
    core = model.blocks[0].self_attn.core
    q, k, v = (t.requires_grad_() for t in qkv())
    assert core(q, k, v, LAYOUT, regime="middle").shape == q.shape  # training: the Triton forward
    with pytest.raises(ScheduleError, match=r"kernel_forward='cuda'.*'triton', 'gluon'"):
        apply_fps_attention(WanModel(CFG).eval(), schedule(), kernel_forward="cuda")


def test_op_needs_a_learned_regimes_mask():
    q, k, v = qkv(b=1)
    with pytest.raises(ValueError, match="learned.*pass its selector's mask as keep"):
        fps_attention_op(q, k, v, LAYOUT, regime("learned"))


def test_batch_regime_names_the_regime_of_the_whole_batch():
    s = schedule()
    assert batch_regime(s, 0.95) == "early" and batch_regime(s, torch.tensor([0.5, 0.6])) == "middle"
    assert batch_regime(s, torch.tensor([0.95, 0.1])) is None  # mixed: each layer splits the batch by σ


def test_regime_by_name_is_the_sigma_path_bit_for_bit():
    """attn_kwargs["regime"] (the deploy runtime's per-step choice) computes exactly what the per-layer choice by σ
    does, in the kernel and in the reference; an unknown name is refused naming the schedule's."""
    x, ctx = dit_inputs()
    for backend in ("kernel", "reference"):
        model = tiny_dit(backend)
        for sigma in (0.2, 0.95):
            t = torch.full((2,), 1000 * sigma)
            with torch.no_grad():
                by_sigma = model(x, t, ctx, attn_kwargs={"sigma": t / 1000})
                density = realised_density(model)
                by_name = model(x, t, ctx, attn_kwargs={"regime": batch_regime(schedule(), sigma)})
            assert torch.equal(by_name, by_sigma), (backend, sigma)
            assert realised_density(model) == density
        with pytest.raises(ScheduleError, match="regime='nope' is not in the schedule: its regimes are"):
            with torch.no_grad():
                model(x, t, ctx, attn_kwargs={"regime": "nope"})


def test_compiled_dit_has_no_graph_break():
    """The fast guard of the slow test below: one regime (its top-k mask selected inside the op), fullgraph."""
    torch._dynamo.reset()
    model = tiny_dit()
    x, ctx = dit_inputs()
    t = torch.full((2,), 200.0)
    kwargs = {"sigma": t / 1000, "regime": "late"}
    with torch.no_grad():
        eager = model(x, t, ctx, attn_kwargs=kwargs)
        assert torch.equal(torch.compile(model, backend="eager", fullgraph=True)(x, t, ctx, attn_kwargs=kwargs), eager)
    torch._dynamo.reset()


def test_compiled_blocks_give_dynamo_constants_no_frozen_dataclass(monkeypatch):
    """Each argument of an `assume_constant_result` function (use_kernel, ...) that a compiled block calls is one
    Dynamo can make a Python constant. torch 2.11 converts every argument so (torch/_dynamo/variables/functions.py
    `invoke_and_store_as_constant`) and raises for a frozen dataclass such as a Regime ("currently can't reconstruct
    arbitrary frozen dataclass instances": the H200's torch 2.11 failed so); 2.13 takes objects by identity and would
    not notice. So this applies 2.11's conversion to what the installed Dynamo sees, blocks compiled as
    `Deployed.compile` compiles them."""
    from torch._dynamo.variables import functions

    real, called = functions.invoke_and_store_as_constant, []

    def as_torch_2_11(tx, fn, name, args, kwargs):
        for arg in [*args, *kwargs.values()]:
            if not arg.is_tensor():
                try:
                    arg.as_python_constant()
                except NotImplementedError as err:
                    raise AssertionError(f"{name}() takes {arg}: torch 2.11 cannot make it a constant") from err
        called.append(name)
        return real(tx, fn, name, args, kwargs)

    monkeypatch.setattr(functions, "invoke_and_store_as_constant", as_torch_2_11)
    torch._dynamo.reset()
    model = tiny_dit()
    for block in model.blocks:
        block.compile(backend="eager", fullgraph=True, dynamic=False)
    x, ctx = dit_inputs()
    t = torch.full((2,), 600.0)
    with torch.no_grad():
        model(x, t, ctx, attn_kwargs={"sigma": t / 1000, "regime": "middle"})
    assert "use_kernel" in called, called
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_dit_is_one_graph_per_regime_and_matches_eager():
    """fullgraph=True: no graph break anywhere in the DiT (Dynamo raises on the first); one compiled graph per
    regime (Dynamo guards on the regime's name); outputs and realised densities equal the eager model's."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = tiny_dit()
    x, ctx = dit_inputs()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    for sigma in (0.95, 0.6, 0.2, 0.97):  # early, middle, late, early again (cached)
        t = torch.full((2,), 1000 * sigma)
        kwargs = {"sigma": t / 1000, "regime": batch_regime(schedule(), sigma)}
        with torch.no_grad():
            eager = model(x, t, ctx, attn_kwargs=kwargs)
            density = realised_density(model)
            got = compiled(x, t, ctx, attn_kwargs=kwargs)
        assert torch.equal(got, eager), sigma
        assert realised_density(model) == density
    assert counter.frame_count == 3
    torch._dynamo.reset()


def test_graph_breaks_name_the_regimes_that_cannot_be_one_graph(caplog):
    cpu = torch.device("cpu")
    assert graph_breaks(schedule(), cpu, 64, backend="kernel") == {}
    learned = Schedule.from_config(FPSConfig(regimes=[REGIMES["learned"]]), TILE)
    assert "selector" in graph_breaks(learned, cpu, 64, backend="kernel")["learned"]
    assert set(graph_breaks(schedule(), cpu, 64, backend="reference")) == {"late", "middle", "early"}
    assert set(graph_breaks(schedule(), cpu, 32, backend="auto")) == {"late", "middle", "early"}  # head_dim 32


# ------------------------------------------------------------------------------------------ the deploy runtime


@pytest.fixture(scope="module")
def kernel_deploy(tmp_path_factory) -> str:
    """A deploy folder of a kernel-sized tiny DiT (head_dim 64) with the schedule above (random weights)."""
    from tests.conftest import export_random

    return export_random(tmp_path_factory.mktemp("deploy_compile"), [
        "+experiment=tiny", "data=synthetic", "model.num_heads=2", "data.latent_frames=3", "data.latent_height=8",
        "data.latent_width=16"], schedule())


def test_load_deploy_passes_kernel_forward_to_the_op(kernel_deploy, tmp_path):
    """load_deploy(kernel_forward="gluon") runs the Gluon forward (here: its CPU-interpreter error) and says so in
    its backend's words; the default runs the Triton forward; a bad value is refused before the folder is read."""
    from fpsa_train.deploy import load_deploy

    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 3, 8, 16, generator=g), torch.randn(1, 5, 64, generator=g)
    gluon = load_deploy(kernel_deploy, backend="kernel", kernel_forward="gluon")
    assert "gluon forward" in gluon.backend
    with pytest.raises(ValueError, match="no CPU interpreter"):
        gluon.denoise(x, 0.6, text)
    assert torch.isfinite(load_deploy(kernel_deploy, backend="kernel").denoise(x, 0.6, text)).all()
    with pytest.raises(ScheduleError, match="kernel_forward='Gluon'"):
        load_deploy(tmp_path / "not_a_deploy_folder", kernel_forward="Gluon")


@pytest.mark.slow
def test_deployed_compile_matches_eager_at_every_step(kernel_deploy, caplog):
    """`Deployed.compile` (aot_eager here; Inductor on the GPU) gives the eager runtime's velocity at a σ of every
    regime, with the sampler's float σ and with a σ tensor, for a batch of mixed regimes (run eagerly), and inside
    `only_regime`; one graph per regime serves every block; the state dict keys stay."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from fpsa_train.deploy import load_deploy

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    eager = load_deploy(kernel_deploy, backend="kernel")
    compiled = load_deploy(kernel_deploy, backend="kernel").compile(backend=counter)
    assert len(compiled.model.blocks) == 2 and list(compiled.model.state_dict()) == list(eager.model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 3, 8, 16, generator=g), torch.randn(2, 5, 64, generator=g)
    for sigma in (0.95, 0.6, torch.tensor([0.2, 0.3]), torch.tensor([0.2, 0.95])):
        assert torch.equal(compiled.denoise(x, sigma, text, timestep=500), eager.denoise(x, sigma, text, timestep=500))
        assert compiled.realised_density() == eager.realised_density()
    assert counter.frame_count == 3  # early, middle, late; the mixed batch ran eagerly
    with compiled.only_regime("late"), eager.only_regime("late"):
        assert torch.equal(compiled.denoise(x, 0.95, text), eager.denoise(x, 0.95, text))
    with caplog.at_level(logging.WARNING, logger="fpsa_train.deploy"):
        load_deploy(kernel_deploy, backend="reference").compile(backend="aot_eager")
    assert "break the graph in every block" in caplog.text and "PyTorch reference" in caplog.text
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiles_the_runtime_around_the_op_on_cpu(kernel_deploy):
    """Inductor (not only aot_eager) lowers the compiled blocks around the op: its fake impl's strides and dtypes
    must hold for Inductor's buffers. On CPU under the interpreter, in fp32, the compiled velocity equals eager's to
    fp32 reassociation (> 60 dB); tests/test_compile_gpu.py does the same with bf16 on the GPU."""
    from fpsa_train.deploy import load_deploy
    from fpsa_train.fps.fp8 import sqnr_db

    torch._dynamo.reset()
    eager = load_deploy(kernel_deploy, backend="kernel")
    compiled = load_deploy(kernel_deploy, backend="kernel").compile(backend="inductor")
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 16, 3, 8, 16, generator=g), torch.randn(2, 5, 64, generator=g)
    for sigma in (0.95, 0.6, 0.2):  # early, middle, late
        db = sqnr_db(eager.denoise(x, sigma, text, timestep=500), compiled.denoise(x, sigma, text, timestep=500))
        assert db > 60, f"σ {sigma}: {db:.1f} dB"
    torch._dynamo.reset()
