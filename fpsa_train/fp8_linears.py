"""FP8 linears for deployment: the DiT's large projections in FP8 e4m3 through torchao (opt-in, off by default).

Why: with bf16 linears a step can never get much faster than its GEMMs. At Wan-14B 720p one denoising step (CFG
batch 2) spends ~5.2 s in bf16 GEMMs (3.6 PFLOP at ~700 TFLOP/s) of a 25.3 s dense step (issue 19); Hopper runs FP8
e4m3 GEMMs at twice the bf16 rate. Quality is not shown yet (`python -m fpsa_train.evaluate fp8_linears=true`
measures it against the bf16-linear model), hence opt-in: `load_deploy(..., fp8_linears=True)`,
`python -m fpsa_train.sample fp8_linears=true`.

What runs: torchao's float8 inference path, `quantize_(model, Float8DynamicActivationFloat8WeightConfig(
granularity=PerRow()))` on the chosen Linears only. The weight is quantized once to e4m3 with one scale per output
channel (a row of W: amax/448); the activation on every call with one scale per token (a row of x); then one
`torch._scaled_mm` (fp32 accumulation, Hopper's fast accumulation) with the bias in its epilogue, out in the input's
dtype. The Linear keeps its class; torchao's `Float8Tensor` replaces its weight parameter (a transform of a built
model: wan.py knows nothing of it). On an H200 without torchao's optional `mslk` kernels the GEMM is plain
`torch._scaled_mm`; torchao's C++ extensions (`_C_cutlass_90a`, `_C_mxfp8`: sparse and MX formats) are not used.

Which Linears (`FP8_LINEARS`, `fp8_linear_names`): in every transformer block, those whose input is the video
tokens: self_attn.q/k/v/o, cross_attn.q/o, ffn.0 and ffn.2, when both their dims are multiples of 16 (what
`_scaled_mm` takes; every Wan size is). Left as they are: cross_attn.k/v (their input is the 512 text tokens:
GEMMs too small for FP8 to pay for its activation quantization), text_embedding (once per step on the text), and
the parts the model computes in fp32 (models/wan.py), time_embedding, time_projection (per sample, not per token) and
the head. Share of the DiT's linear FLOPs (multiply-adds of all its Linears) in FP8 (`linear_flops`):

    Wan-1.3B 480p (32,760 tokens)   99.80%   (cross_attn.k/v 0.18%, embeddings and head 0.02%)
    Wan-14B 720p (75,600 tokens)    99.88%   (cross_attn.k/v 0.12%, embeddings and head 0.01%)
    proving ground (world_s, 1,280 tokens)  93.4% (cross_attn.k/v over 512 text tokens are 5.3% at this size)

Dtypes: a converted Linear's weight and bias are bf16 first (the stored dtype of a deploy folder, so this loses
nothing there; torchao's per-row path takes bf16 weights only). torchao's weight subclass takes `F.linear` before
autocast would cast its input, and the DiT feeds its Linears fp32 (residual stream and norms are fp32), so without
help the GEMM would write fp32 (which CUDA's per-row `_scaled_mm` takes only through cuBLAS >= 12.9 on sm90; its
CUTLASS kernel writes bf16 or fp16). A forward pre-hook casts the input to bf16 under autocast and on CUDA, so every
tensor after a converted Linear has the dtype it has with bf16 linears under the deploy runtime's bf16 autocast.
On the CPU without autocast the output is fp32.

Hardware: FP8 GEMMs need CUDA compute capability >= 8.9 (Ada, Hopper), and torchao's config refuses anything else.
torch 2.13's CPU build implements `torch._scaled_mm` with per-row scales, and torchao's Float8Tensor runs there
unchanged: `allow_cpu=True` lifts torchao's gate (its `_check_hardware_support`, for that one call) so that the CPU
tests run the very same path (slow, and without fast accumulation: numerics only, never speed).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager, nullcontext
from importlib import metadata

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8_LINEARS = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qo]|ffn\.[02])")
"""Full module names of the Linears converted (matched whole): those of each block whose input is the video tokens."""
MIN_COMPUTE_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and later."""
_MIN_CC = "%d.%d" % MIN_COMPUTE_CAPABILITY
TORCHAO_MIN = "0.18"
"""The torchao whose float8 inference API (Float8DynamicActivationFloat8WeightConfig, PerRow) this is written for."""
INSTALL = "pip install 'fpsa[fp8]' (torchao, pure Python over torch._scaled_mm; it pulls no other package)"


class FP8LinearsUnavailable(RuntimeError):
    """FP8 linears cannot run here; the message names what is missing."""


def fp8_linear_names(model: nn.Module) -> list[str]:
    """Names of the Linears `apply_fp8_linears` converts: matching `FP8_LINEARS`, both dims multiples of 16, and
    not converted already (their weight is still a plain floating-point tensor)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and FP8_LINEARS.fullmatch(name) and m.in_features % 16 == 0
            and m.out_features % 16 == 0 and type(m.weight.data) is torch.Tensor and m.weight.is_floating_point()]


def linear_flops(cfg, tokens: int) -> dict[str, int]:
    """Multiply-adds per sample of the DiT's Linears at `tokens` video tokens, split as `apply_fp8_linears` splits
    them: {fp8, cross_kv, other} (`cfg` a WanConfig; `other` = text and time embeddings and the head)."""
    d, lt = cfg.dim, cfg.text_len
    per_block = 6 * tokens * d * d + 2 * tokens * d * cfg.ffn_dim  # self q/k/v/o + cross q/o, ffn.0 + ffn.2
    patch_out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    other = lt * (cfg.text_dim * d + d * d) + cfg.freq_dim * d + 7 * d * d + tokens * d * patch_out
    return {"fp8": cfg.num_layers * per_block, "cross_kv": cfg.num_layers * 2 * lt * d * d, "other": other}


def _import_torchao():
    """torchao's `quantize_`, config and `PerRow`, or FP8LinearsUnavailable naming what is missing. torchao's import
    logs a warning for each C++ extension it cannot load (all of them under a CPU torch) and torch one for its
    enum; neither matters to this path, so both loggers are quieted for the import."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise FP8LinearsUnavailable(f"FP8 linears need torchao >= {TORCHAO_MIN}, which is not installed ({e}): "
                                    f"{INSTALL}") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise FP8LinearsUnavailable(f"torchao {metadata.version('torchao')} lacks its float8 inference API ({e}); "
                                    f"FP8 linears need torchao >= {TORCHAO_MIN}: {INSTALL}") from e
    return quantize_, Float8DynamicActivationFloat8WeightConfig, PerRow


def check_device(device: torch.device, allow_cpu: bool = False) -> None:
    """Raise FP8LinearsUnavailable unless `device` runs FP8 GEMMs (CUDA, compute capability >= 8.9), or is the CPU
    with `allow_cpu`."""
    if device.type == "cpu" and allow_cpu:
        return
    if device.type != "cuda":
        raise FP8LinearsUnavailable(
            f"FP8 linears need a CUDA GPU of compute capability >= {_MIN_CC} (FP8 tensor cores: Ada, Hopper); the "
            f"model is on {device}. Load it on such a GPU, or leave fp8_linears off (tests: "
            "apply_fp8_linears(..., allow_cpu=True) runs torchao's path on the CPU, slowly)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_COMPUTE_CAPABILITY:
        raise FP8LinearsUnavailable(
            f"FP8 linears need CUDA compute capability >= {_MIN_CC}; {device} is {torch.cuda.get_device_name(device)} "
            f"({major}.{minor}): leave fp8_linears off")


def check_fp8_available(device: torch.device, allow_cpu: bool = False) -> None:
    """Everything `apply_fp8_linears` needs on `device` (torchao, FP8 GEMMs), checked without a model: callers that
    are about to read gigabytes of weights ask first."""
    check_device(torch.device(device), allow_cpu)
    _import_torchao()


@contextmanager
def _cpu_gate_lifted():
    """torchao's config asserts a CUDA GPU >= 8.9 (`quant_api._check_hardware_support`) although its per-row path
    runs on a CPU torch that implements `_scaled_mm`; lifted for one `quantize_` call."""
    from torchao.quantization import quant_api

    gate = quant_api._check_hardware_support
    quant_api._check_hardware_support = lambda granularity: None
    try:
        yield
    finally:
        quant_api._check_hardware_support = gate


def _input_to_bf16(module: nn.Module, args: tuple):
    """Forward pre-hook: the input in bf16 while autocast is on (as autocast casts a bf16 Linear's: the deploy runtime's
    case) and always on CUDA (where per-row `_scaled_mm` writes fp32 only through cuBLAS >= 12.9 on sm90)."""
    x = args[0]
    if x.dtype != torch.bfloat16 and (x.is_cuda or torch.is_autocast_enabled(x.device.type)):
        return (x.to(torch.bfloat16), *args[1:])
    return None


def apply_fp8_linears(model: nn.Module, allow_cpu: bool = False) -> list[str]:
    """Convert the Linears named by `fp8_linear_names(model)` to FP8 (torchao, per-row scales) in place; returns their
    names. Raises FP8LinearsUnavailable (torchao missing or too old, or a device without FP8 GEMMs) before anything
    changes, and ValueError when no Linear matches (not a Wan DiT, or converted already)."""
    names = fp8_linear_names(model)
    if not names:
        raise ValueError(f"no Linear of {type(model).__name__} matches the FP8 rule ({FP8_LINEARS.pattern}, dims "
                         "multiples of 16): not a Wan DiT, or its linears are FP8 already")
    modules = dict(model.named_modules())
    device = modules[names[0]].weight.device
    check_device(device, allow_cpu)
    quantize_, Config, PerRow = _import_torchao()
    selected = set(names)
    for name in names:
        modules[name].to(torch.bfloat16)  # the deploy folder's dtype; torchao's per-row path quantizes bf16 weights
    # set_inductor_config=False: the transform changes no global compiler settings (torch.compile is the caller's)
    config = Config(granularity=PerRow(), set_inductor_config=False)
    with _cpu_gate_lifted() if device.type == "cpu" else nullcontext():
        quantize_(model, config, filter_fn=lambda module, fqn: fqn in selected)
    left = [n for n in names if type(modules[n].weight.data) is torch.Tensor]
    if left:  # torchao skips a weight it cannot take instead of raising
        shapes = [tuple(modules[n].weight.shape) for n in left[:4]]
        raise RuntimeError(f"torchao {metadata.version('torchao')} left {left[:4]} unconverted (weights {shapes})")
    for name in names:
        modules[name].register_forward_pre_hook(_input_to_bf16)
    log.info("FP8 linears (torchao %s, per-row e4m3): %d Linears of %d blocks", metadata.version("torchao"),
             len(names), len(getattr(model, "blocks", ())))
    return names
