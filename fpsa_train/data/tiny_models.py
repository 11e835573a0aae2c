"""A tiny Wan2.1 VAE, text encoder and tokenizer, built locally in the layout of a real diffusers checkpoint.

Why: the tiny default must run the real pipeline (mp4 → VAE latents + UMT5 embeddings → DiT → decode to video) on a
laptop with nothing downloaded. So this writes `vae/`, `text_encoder/`, `tokenizer/` and `model_index.json` as
`Wan-AI/Wan2.1-T2V-1.3B-Diffusers` has them, and `load_components` loads them with the same three `from_pretrained`
calls a real checkpoint needs: no code path is tiny-only.

- **VAE**: a diffusers `AutoencoderKLWan` with Wan's layout at base_dim 16 (4× time, 8× space, 16 latent channels,
  causal chunks of 4 frames). The demo must decode to recognisable video, so it is trained briefly on random crops
  of the synthetic clips (AdamW, L1 + MSE of decode(encode(x).mode())). A few hundred CPU steps are far too few
  from diffusers' default init (the decoder learns to ignore z: ~15 dB), so `_init_for_short_training` starts it
  as a smooth near-identity (block average down, bilinear up, per-frame convs, zero residual branches): ~23 dB in
  the same steps. The PSNR of full held-out clips goes in `build_report.json`. Its config's `latents_mean` /
  `latents_std` (the 16 Wan constants in a real checkpoint, reference/wan.md §5) are set to the per-channel
  statistics of its latent means on training clips, so normalised latents are ~unit variance as the DiT expects.
- **Text encoder**: a random 2-layer `UMT5EncoderModel` with d_model = TINY_TEXT_DIM. Random is enough: distinct
  captions give distinct embeddings, and the DiT learns to read them (as Wan learns to read the frozen UMT5-XXL).
- **Tokenizer**: a word-level `tokenizers` model over the synthetic captions' vocabulary with T5's special ids
  (`<pad>` 0, `</s>` 1, `<unk>` 2) and a `</s>` appended, saved as a `PreTrainedTokenizerFast`.

The folder is built in a temporary sibling and renamed at the end, so it is either complete or absent; a complete
one whose `build_report.json` has the same parameters (seed, vae_steps, hash of the clips) is reused.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from fpsa_train.data.synthetic_video import caption_vocabulary

TINY_TEXT_DIM = 64  # must equal configs/model/tiny.yaml text_dim
VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True])  # Wan's layout: 4× time, 8× space
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
CROP = (5, 40, 40)  # (frames, height, width): one causal first frame + one 4-frame chunk; sized for the CPU budget
BATCH = 2
LR = 2e-4  # 1e-3 and above is unstable with the RMS norms; measured best of 1e-4 .. 2e-3
EVAL_FRAMES = 17  # full-clip evaluation: 17 frames → 5 latent frames
BUILD_FORMAT = 2  # bump when the build changes, so cached folders are rebuilt
REPORT = "build_report.json"


def build_tiny_wan_components(folder: str | Path, clips_metadata: str | Path | None, *, seed: int = 0,
                              vae_steps: int = 300, force: bool = False, eval_clips: int = 2,
                              stats_clips: int = 4) -> dict:
    """Build (or reuse) the tiny component folder; return its report (paths, psnr_db, seconds, parameter counts).

    `clips_metadata` is a `video,prompt` CSV (see synthetic_video.generate_clips); its last `eval_clips` clips are
    held out for the PSNR, the first `stats_clips` set the latent statistics, and all but the held-out ones train
    the VAE. None skips training (an untrained VAE with latents_mean/std 0/1, for fast tests).
    """
    from diffusers import AutoencoderKLWan

    folder = Path(folder).resolve()
    videos, clips_hash = _clip_list(clips_metadata) if clips_metadata is not None else ([], None)
    params = {"format": BUILD_FORMAT, "seed": seed, "vae_steps": vae_steps if videos else 0,
              "eval_clips": eval_clips, "stats_clips": stats_clips, "clips_hash": clips_hash}
    try:
        cached = json.loads((folder / REPORT).read_text())
    except (OSError, ValueError):
        cached = None
    if cached is not None and cached.get("params") == params and not force:
        return _with_paths(cached, folder)

    start = time.perf_counter()
    tmp = folder.parent / f".{folder.name}.building{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report: dict = {"params": params, "clips_metadata": str(clips_metadata) if clips_metadata else None}
    with torch.random.fork_rng(devices=[]):  # seeded builds without disturbing the caller's RNG
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**VAE_CONFIG)
        if videos:
            report.update(_train_vae(vae, videos, seed, vae_steps, eval_clips, stats_clips))
        else:
            _init_for_short_training(vae, torch.zeros(3))
            report["vae_training"] = "skipped (clips_metadata=None): untrained VAE, latents_mean/std 0/1"
            vae.register_to_config(latents_mean=[0.0] * vae.config.z_dim, latents_std=[1.0] * vae.config.z_dim)
        vae.save_pretrained(tmp / "vae")
        tokenizer = _save_tokenizer(tmp / "tokenizer")
        torch.manual_seed(seed + 1)
        text_encoder = _build_text_encoder(len(tokenizer))
        text_encoder.save_pretrained(tmp / "text_encoder")
    _write_model_index(tmp)
    report["params_count"] = {name: sum(p.numel() for p in model.parameters())
                              for name, model in (("vae", vae), ("text_encoder", text_encoder))}
    report["vocab_size"] = len(tokenizer)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["torch_threads"] = torch.get_num_threads()
    (tmp / REPORT).write_text(json.dumps(report, indent=1) + "\n")  # its presence marks a complete folder

    old = folder.parent / f".{folder.name}.old{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return _with_paths(report, folder)


def load_components(folder: str | Path, device: str | torch.device = "cpu", text_dtype: torch.dtype = torch.float32):
    """(vae, text_encoder, tokenizer) in eval mode from a Wan2.1 diffusers-layout folder, tiny or real. The VAE is
    fp32 as in Wan; `text_dtype` bfloat16 halves the real UMT5-XXL (11 GB in bf16)."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel

    folder = Path(folder)
    # low_cpu_mem_usage=False: plain construction + load_state_dict. Without `accelerate` diffusers falls back to
    # it anyway, with a warning; asking for it directly is silent.
    vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32, low_cpu_mem_usage=False)
    text_encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=text_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    return vae.to(device).eval(), text_encoder.to(device).eval(), tokenizer


# --- VAE training ---------------------------------------------------------------------------------------------

@torch.no_grad()
def _init_for_short_training(vae, mean_rgb: torch.Tensor) -> None:
    """Start the VAE as a smooth near-identity, so a few hundred steps suffice (from diffusers' init they do not).

    Every conv: N(0, 1/fan_in), zero bias, and only its current-frame tap (causal 3D convs act per frame, so
    appearance is learnt before motion). Residual branches (second conv) and attention outputs: zero, so each block
    starts as its shortcut. Spatial resampling: 2×2 average down, bilinear up; temporal resampling: keep the
    current frame (down) or repeat it (up). Input and output are centred on the clips' mean colour (dark
    backgrounds), so the RMS norms see colour differences rather than one large common offset.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

    for m in vae.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            m.weight.normal_(0.0, 1.0 / math.sqrt(m.weight[0].numel()))
            m.bias.zero_()
            if m.weight.dim() == 5 and m.weight.shape[2] == 3 and m.weight.shape[3] > 1:
                m.weight[:, :, :2] = 0.0  # (C_out, C_in, kt, kh, kw): causal taps t-2, t-1 off
                m.weight[:, :, 2] *= math.sqrt(3.0)
    bilinear = torch.tensor([0.25, 0.5, 0.25])
    for m in vae.modules():
        if isinstance(m, WanResidualBlock):
            m.conv2.weight.zero_()
        elif isinstance(m, WanAttentionBlock):
            m.proj.weight.zero_()
        elif isinstance(m, WanResample) and m.mode != "none":
            if hasattr(m, "time_conv"):  # (C_out, C_in, 3, 1, 1); upsampling has C_out = 2 C_in (two frames)
                w = m.time_conv.weight
                w.zero_()
                for k in range(w.shape[0] // w.shape[1]):
                    w[k * w.shape[1]:(k + 1) * w.shape[1], :, 2, 0, 0] = torch.eye(w.shape[1])
            w = m.resample[1].weight  # Conv2d (C_out, C_in, 3, 3): after nearest ×2 up, or stride 2 after a pad
            w.zero_()
            idx = torch.arange(min(w.shape[:2]))  # up halves the channels: keep the first half
            if m.mode.startswith("up"):
                w[idx, idx] = torch.outer(bilinear, bilinear)  # nearest ×2 then this = bilinear ×2
            else:
                w[idx, idx, :2, :2] = 0.25  # stride 2 after a right/bottom pad: the 2×2 block average
    conv_in = vae.encoder.conv_in
    conv_in.bias.copy_(-conv_in.weight.sum((2, 3, 4)) @ mean_rgb)
    vae.decoder.conv_out.bias.copy_(mean_rgb)


def _train_vae(vae, videos: list[Path], seed: int, steps: int, eval_clips: int, stats_clips: int) -> dict:
    clips = [_load_video(p) for p in videos]  # each (3, T, H, W) uint8
    n_eval = eval_clips if len(clips) > eval_clips else 0
    train, held_out = clips[: len(clips) - n_eval], clips[len(clips) - n_eval:] or clips[:eval_clips]
    _init_for_short_training(vae, torch.stack([_signed(c).mean((1, 2, 3)) for c in train]).mean(0))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
    warmup, total = max(1, steps // 20), max(1, steps)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, cosine decay to 5 %
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / total))))
    # A second OpenMP thread makes a step at most ~15 % faster (0.235 vs 0.27 s, 2 cores), but stalls 10-50× when
    # another process holds a core (seen on a busy box): so one thread when the load average says the cores are busy.
    threads, losses, t0 = torch.get_num_threads(), [], time.perf_counter()
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) - 1
    train_threads = 1 if busy else threads
    torch.set_num_threads(train_threads)
    try:
        vae.train()
        for _ in range(steps):
            x = torch.stack([_random_crop(train, g) for _ in range(BATCH)])  # (B, 3, T, h, w)
            recon = _decode_unclamped(vae, vae.encode(x).latent_dist.mode())  # (B, 3, T, h, w)
            loss = (recon - x).abs().mean() + (recon - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
        vae.eval()
    train_seconds = time.perf_counter() - t0
    mean, std = _latent_stats(vae, train[:stats_clips])
    vae.register_to_config(latents_mean=mean, latents_std=std)
    return {"vae_training": f"{steps} steps, batch {BATCH} of {list(CROP)} crops from {len(train)} clips",
            "psnr_db": _psnr(vae, held_out), "held_out_clips": n_eval,
            "train_seconds": round(train_seconds, 2), "train_threads": train_threads,
            "latents_mean": mean, "latents_std": std,
            "loss_first_last": [round(float(np.mean(part or [0.0])), 4) for part in (losses[:10], losses[-10:])]}


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` before its final clamp to [-1, 1]: through the clamp, an output channel that starts beyond
    the range (dark backgrounds are near -1) gets no gradient and stays stuck there. The decoder runs once per
    latent frame (causal cache), so the hook collects the chunks in order."""
    chunks: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda module, args, out: chunks.append(out))
    try:
        vae.decode(z)
    finally:
        hook.remove()
    return torch.cat(chunks, dim=2)  # (B, 3, T, H, W)


def _random_crop(clips: list[torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """A CROP-sized piece of a random clip, at frame stride 1 or 2 (preprocessing resamples 24 fps clips to 16 fps,
    so the VAE meets faster motion than the files hold), flipped left-right half the time."""
    clip = clips[int(torch.randint(len(clips), (1,), generator=g))]
    _, t_, h_, w_ = clip.shape
    stride = 1 + int(torch.randint(2, (1,), generator=g)) if t_ >= 2 * CROP[0] - 1 else 1
    t = min(CROP[0], 1 + ((t_ - 1) // stride) // 4 * 4)
    h, w, span = min(CROP[1], h_ // 8 * 8), min(CROP[2], w_ // 8 * 8), (t - 1) * stride + 1
    t0, y0, x0 = (int(torch.randint(n - m + 1, (1,), generator=g)) for n, m in ((t_, span), (h_, h), (w_, w)))
    crop = _signed(clip[:, t0:t0 + span:stride, y0:y0 + h, x0:x0 + w])  # (3, t, h, w)
    return crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop


def _full(clip: torch.Tensor) -> torch.Tensor:
    """The clip's first 4n+1 <= EVAL_FRAMES frames, cropped to multiples of 8: (1, 3, T, H, W)."""
    _, t_, h_, w_ = clip.shape
    t = 1 + (min(t_, EVAL_FRAMES) - 1) // 4 * 4
    return _signed(clip[None, :, :t, : h_ // 8 * 8, : w_ // 8 * 8])


@torch.no_grad()
def _psnr(vae, clips: list[torch.Tensor]) -> float:
    """PSNR (dB) on the [0, 1] scale of full-clip reconstructions, pooled over the clips."""
    se, n = 0.0, 0
    for clip in clips:
        x = _full(clip)
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        se += ((recon - x) / 2).pow(2).sum().item()
        n += x.numel()
    return round(10 * math.log10(n / max(se, 1e-12)), 2)


@torch.no_grad()
def _latent_stats(vae, clips: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the latent means (what preprocessing normalises with)."""
    mu = torch.cat([vae.encode(_full(c)).latent_dist.mode().flatten(2) for c in clips], dim=2)  # (1, C, N)
    std = mu.std((0, 2)).clamp_min(1e-3)  # a dead channel must not blow up the normalised latents
    return [round(v, 5) for v in mu.mean((0, 2)).tolist()], [round(v, 5) for v in std.tolist()]


def _load_video(path: Path) -> torch.Tensor:
    """(3, T, H, W) uint8: kept as bytes (a quarter of float32) until a crop is taken."""
    import decord

    reader = decord.VideoReader(str(path))
    return torch.from_numpy(reader.get_batch(list(range(len(reader)))).asnumpy()).permute(3, 0, 1, 2)


def _signed(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 127.5 - 1.0  # uint8 → [-1, 1], the VAE's input range


def _clip_list(metadata: str | Path) -> tuple[list[Path], str]:
    """The clips a `video,prompt` CSV lists, and a hash of their names and bytes (the cache key)."""
    metadata, h = Path(metadata), hashlib.sha256()
    with open(metadata, newline="") as f:
        videos = [metadata.parent / row["video"] for row in csv.DictReader(f)]
    if not videos:
        raise ValueError(f"{metadata}: no clips listed (expected a `video,prompt` CSV)")
    for p in videos:
        h.update(p.name.encode() + p.read_bytes())
    return videos, h.hexdigest()[:16]


# --- text side ------------------------------------------------------------------------------------------------

def _save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + caption_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words; punctuation becomes separate (<unk>) tokens
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=512)
    tokenizer.save_pretrained(folder)
    # transformers 5 writes `tokenizer_class: TokenizersBackend`, a name 4.x lacks; both load the generic one.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tokenizer


def _build_text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return UMT5EncoderModel(config).eval()


# --- folder bookkeeping ---------------------------------------------------------------------------------------

def _write_model_index(folder: Path) -> None:
    """As in a diffusers WanPipeline folder; the transformer is this project's own DiT, so it is left empty."""
    import diffusers

    index = {"_class_name": "WanPipeline", "_diffusers_version": diffusers.__version__,
             "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
             "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "transformer": [None, None],
             "scheduler": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")


def _with_paths(report: dict, folder: Path) -> dict:
    names = ("vae", "text_encoder", "tokenizer", "model_index.json", REPORT)
    return {**report, "folder": str(folder), "paths": {n: str(folder / n) for n in names}}
