"""`python -m fpsa_train.sample deploy=... prompt=...`: text → video with an exported model (an mp4 and a PNG sheet).

The chain is Wan's (reference/wan.md §4): the prompt and the negative prompt through UMT5 (unpadded embeddings,
zero-padded to 512 inside the DiT, no mask), Gaussian noise of the latent shape, flow-matching UniPC (diffusers'
`UniPCMultistepScheduler` with flow sigmas, order 2, bh2, shifted σ) with classifier-free guidance
v = v_neg + g·(v_pos − v_neg), both branches in one batch of two, the model fed the scheduler's integer timestep
as Wan's sampler feeds it, then the latents de-normalised with the VAE's
16-channel mean/std and decoded by the Wan VAE. At every step the deploy runtime runs each sample through the
regime that owns the step's σ, exactly as training did; the report counts the steps per regime.

The VAE and text encoder come from a Wan2.1 diffusers-format folder (`components`: vae/, text_encoder/,
tokenizer/); the embedded tiny default records its own in the checkpoint, so the demo needs no path. Height, width
and frames default to the clip size the model was trained on (manifest), else Wan's 480×832, 81 frames.

The pieces are library functions so that `python -m fpsa_train.evaluate` samples exactly as this command does:
`initial_noise` (seeded on the CPU, so a seed means the same noise on every device and for every model),
`denoise_loop` (sampling.py, shared with the training run's validation videos; optionally tracing σ, regime,
realised attention density and seconds per step) and `generate` (noise → decoded uint8 frames with a loaded deploy
folder and encoders). The encoders and the negative prompt live in encoders.py, the mp4 and the contact sheet in
media.py; their old names here (`denoise_loop`, `flow_unipc`, `negative_prompt`, `contact_sheet`, ...) still import.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fpsa_train.atomic import write_atomic
from fpsa_train.config import ConfigError
from fpsa_train.encoders import (  # noqa: F401  WAN_NEGATIVE_PROMPT, default_negative_prompt: re-exported
    WAN_NEGATIVE_PROMPT, Encoders, default_negative_prompt, negative_prompt)
from fpsa_train.fps.schedule import BACKENDS, ScheduleError
from fpsa_train.fps.transform import check_kernel_forward
from fpsa_train.media import contact_sheet, write_mp4
from fpsa_train.sampling import denoise_loop, flow_unipc  # noqa: F401  flow_unipc: re-exported

log = logging.getLogger(__name__)

WAN_VIDEO = {"height": 480, "width": 832, "frames": 81}


@dataclass
class SampleConfig:
    deploy: str = MISSING
    """A deploy folder written by `python -m fpsa_train.export`."""
    prompt: str = MISSING
    """What the video shows."""
    negative_prompt: Optional[str] = None
    """The guidance's negative branch; null: the components' own (model_index.json `_fpsa_negative_prompt`: "" for
    the synthetic world's), else Wan's default."""
    components: Optional[str] = None
    """Wan2.1 diffusers-format folder with vae/, text_encoder/, tokenizer/; default: the one the run trained with."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (1 = no guidance: one branch only)."""
    shift: float = 5.0
    """Flow shift of the sampling σ schedule (Wan: 5.0 for T2V; 3.0 is common at 480p)."""
    seed: int = 0
    """Seed of the initial noise."""
    height: Optional[int] = None
    """Video height in pixels (multiple of 16); default: the training clips' (manifest), else 480."""
    width: Optional[int] = None
    """Video width in pixels (multiple of 16); default: the training clips', else 832."""
    frames: Optional[int] = None
    """Frames, 4n+1; default: the training clips', else 81."""
    fps: float = 16.0
    """Frame rate of the mp4."""
    out: str = "outputs/samples"
    """Folder for the mp4 and the PNG."""
    name: Optional[str] = None
    """File name stem; default: the prompt's first words and the seed."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    backend: str = "auto"
    """FPS attention: auto (kernel on H100/H200, reference elsewhere), reference, kernel."""
    fp8_linears: bool = False
    """The blocks' large Linears in FP8 (torchao, per-row scales; fpsa_train/fp8_linears.py). Off by default until its
    quality is shown; needs torchao (`pip install 'fpsa[fp8]'`) and a CUDA GPU of compute capability >= 8.9."""
    compile: bool = False
    """torch.compile the DiT (`Deployed.compile`): the first step of each regime compiles, later steps run faster."""
    kernel_forward: str = "triton"
    """The FP8 kernel's inference forward: triton, or gluon (warp-specialised; Hopper and head dim 128 only: elsewhere
    the kernel raises). Regimes the PyTorch reference runs are unaffected."""
    sheet_frames: int = 8
    """Frames on the PNG contact sheet (evenly spaced)."""

    def __post_init__(self) -> None:
        check_sampling_options(self)
        if self.sheet_frames < 1:
            raise ConfigError(f"sheet_frames={self.sheet_frames} must be >= 1")


def check_sampling_options(cfg) -> None:
    """The checks every sampling config shares (sample, evaluate): steps, guidance, shift, backend, kernel_forward,
    device."""
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    if cfg.guidance < 1:
        raise ConfigError(f"guidance={cfg.guidance} must be >= 1 (1 disables classifier-free guidance)")
    if cfg.shift <= 0:
        raise ConfigError(f"shift={cfg.shift} must be > 0")
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"backend={cfg.backend!r}: expected one of {BACKENDS}")
    try:
        check_kernel_forward(cfg.kernel_forward)
    except ScheduleError as err:
        raise ConfigError(str(err)) from None
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device={cfg.device!r}: expected auto, cpu or cuda[:N]")


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def components_folder(components: str | None, manifest: dict) -> str:
    """The Wan2.1 diffusers folder to encode and decode with: the one given, else the one the run trained with."""
    folder = components or manifest.get("sampling", {}).get("components")
    if not folder or not Path(folder).is_dir():
        raise ConfigError(f"components={folder!r} is not a folder: pass components=<Wan2.1 diffusers folder with "
                          "vae/, text_encoder/, tokenizer/> (e.g. Wan2.1-T2V-1.3B-Diffusers)")
    return folder


def video_size(cfg: SampleConfig, manifest: dict) -> tuple[int, int, int]:
    """(height, width, frames): the config's, else the training clips' from the manifest, else Wan's."""
    trained = manifest.get("sampling", {}).get("video") or WAN_VIDEO
    h, w, f = (v if v is not None else trained[k] for k, v in
               (("height", cfg.height), ("width", cfg.width), ("frames", cfg.frames)))
    if h % 16 or w % 16 or h < 16 or w < 16:
        raise ConfigError(f"height={h}, width={w}: both must be positive multiples of 16 (VAE 8× and patch 2×)")
    if f < 1 or (f - 1) % 4:
        raise ConfigError(f"frames={f} must be 4n+1 (e.g. 17, 49, 81)")
    return h, w, f


def initial_noise(seed: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Gaussian noise of `shape` (1, C, T, H, W) fp32 from a CPU generator seeded with `seed`, then moved to `device`:
    a seed gives bit-identical noise on every device and for every model of that latent shape, which is what makes
    videos of different models (a candidate and its reference) comparable frame by frame."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def latent_shape(in_dim: int, vae, height: int, width: int, frames: int) -> tuple[int, int, int, int, int]:
    """(1, C, T, H, W) of the latents that the Wan VAE decodes to `frames` frames of height × width."""
    downsample = list(vae.config.temperal_downsample)
    t_scale, s_scale = 2 ** sum(downsample), 2 ** len(downsample)
    return 1, in_dim, (frames - 1) // t_scale + 1, height // s_scale, width // s_scale


@torch.no_grad()
def decode(enc, latents: torch.Tensor) -> np.ndarray:
    """Normalised latents (1, C, T, H, W) → (F, H, W, 3) uint8 frames, by the Wan VAE of `enc`
    (encoders.Encoders)."""
    pixels = enc.vae.decode(latents * enc.std + enc.mean).sample  # (1, 3, F, H, W) in [-1, 1]
    return ((pixels[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class Generated:
    """One sampled video and how it was made."""

    video: np.ndarray
    """(F, H, W, 3) uint8 frames."""
    steps_per_regime: dict
    """{regime name: steps} (empty when attention is dense SDPA)."""
    seconds_denoising: float
    """Wall time of the denoising loop (the decode excluded)."""
    trace: list
    """Per step: {step, sigma, timestep, regime, density, seconds} (`denoise_loop`)."""


def generate(deployed, enc, texts: list, noise: torch.Tensor, steps: int, shift: float, guidance: float,
             leave: bool = True) -> Generated:
    """Noise (1, C, T, H, W) → decoded video with a loaded deploy folder (`deploy.Deployed`) and the encoders' VAE;
    `texts` are the embeddings of [prompt, negative] (guidance > 1) or [prompt] (`Encoders.text`)."""
    trace: list = []
    started = time.perf_counter()
    latents, regimes = denoise_loop(deployed, noise, texts, steps, shift, guidance, trace=trace, leave=leave)
    seconds = time.perf_counter() - started
    return Generated(decode(enc, latents), regimes, seconds, trace)


def generate_batch(deployed, enc, texts: list[list], noises: list[torch.Tensor], steps: int, shift: float,
                   guidance: float, leave: bool = True) -> list[Generated]:
    """`generate` for several videos denoised together: `texts[i]` and `noises[i]` are video i's (as for
    `generate`). Each video is decoded alone; the trace (its density a batch mean) and the denoising time are the
    batch's, the time divided by the number of videos."""
    if len(noises) == 1:
        return [generate(deployed, enc, texts[0], noises[0], steps, shift, guidance, leave=leave)]
    context = [t[0] for t in texts] + [t[1] for t in texts if len(t) == 2]
    trace: list = []
    started = time.perf_counter()
    latents, regimes = denoise_loop(deployed, torch.cat(noises), context, steps, shift, guidance, trace=trace,
                                    leave=leave)
    seconds = (time.perf_counter() - started) / len(noises)
    return [Generated(decode(enc, latents[i:i + 1]), regimes, seconds, trace) for i in range(len(noises))]


def _stem(cfg: SampleConfig) -> str:
    if cfg.name:
        return cfg.name
    words = re.sub(r"[^a-z0-9]+", "_", cfg.prompt.lower()).strip("_")[:48].rstrip("_") or "sample"
    return f"{words}_seed{cfg.seed}"


def sample(cfg: SampleConfig) -> dict:
    """Generate one video; returns {mp4, png, seconds, seconds_per_step, steps_per_regime, backend, size,
    prompt_check}: for a prompt of the synthetic world, whether the analyzer finds what it states
    (eval/following.py)."""
    from fpsa_train.deploy import load_deploy

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    deployed = load_deploy(cfg.deploy, device=device, backend=cfg.backend, fp8_linears=cfg.fp8_linears,
                           compile=cfg.compile, kernel_forward=cfg.kernel_forward)
    manifest = deployed.manifest
    height, width, frames = video_size(cfg, manifest)
    components = components_folder(cfg.components, manifest)

    enc = Encoders(components, device, deployed.model.cfg.text_len)
    negative = negative_prompt(cfg.negative_prompt, components, enc.tokenizer) if cfg.guidance > 1 else None
    texts = enc.text([cfg.prompt, negative] if cfg.guidance > 1 else [cfg.prompt])
    del enc.text_encoder  # not needed past this point (UMT5-XXL is 11 GB in bf16)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    noise = initial_noise(cfg.seed, latent_shape(deployed.model.cfg.in_dim, enc.vae, height, width, frames), device)
    generated = generate(deployed, enc, texts, noise, cfg.steps, cfg.shift, cfg.guidance)
    video, regimes, loop_seconds = generated.video, generated.steps_per_regime, generated.seconds_denoising

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(cfg)
    mp4, png = out / f"{stem}.mp4", out / f"{stem}.png"
    write_mp4(mp4, video, cfg.fps)
    sheet = contact_sheet(video, cfg.sheet_frames)
    write_atomic(png, lambda f: sheet.save(f, format="PNG"))
    from fpsa_train.eval.following import analyzer_unavailable, follow

    why_not = analyzer_unavailable()  # a prompt of the synthetic world is checked against the video
    check = follow(cfg.prompt, video) if why_not is None else {"applicable": False, "reason": why_not}
    report = {"mp4": str(mp4), "png": str(png), "size": [height, width, frames], "steps": cfg.steps,
              "negative_prompt": negative,
              "prompt_check": check, "steps_per_regime": regimes, "backend": deployed.backend,
              "fp8_linears": cfg.fp8_linears, "compile": cfg.compile, "kernel_forward": cfg.kernel_forward,
              "seconds_denoising": round(loop_seconds, 3), "seconds_per_step": round(loop_seconds / cfg.steps, 4),
              "seconds": round(time.perf_counter() - started, 3)}
    log.info("sample written: %s", report)
    return report


@hydra.main(config_path="../configs/tools", config_name="sample", version_base="1.3")
def main(cfg) -> None:
    from fpsa_train.config import resolve

    from fpsa_train.eval.following import verdict

    report = sample(resolve(cfg))
    regimes = ", ".join(f"{n} {name}" for name, n in report["steps_per_regime"].items())
    print(f"video: {report['mp4']}\ncontact sheet: {report['png']}\n"
          f"{report['steps']} steps in {report['seconds_denoising']:.1f} s{f' ({regimes})' if regimes else ''}, "
          f"attention: {report['backend']}\n"
          f"prompt check (the synthetic world's analyzer): {verdict(report['prompt_check'])}")


if __name__ == "__main__":
    main()
