"""Make sure a video data config has its cache: generate clips, build tiny encoders, preprocess, each only once.

For the embedded `tiny` default this is the whole chain (synthetic mp4 clips → tiny Wan-layout VAE, UMT5 and
tokenizer → cached latents), run on first use and reused afterwards. For real data only the preprocessing step
applies, with the user's metadata file and Wan2.1 diffusers folder; a complete cache is reused as it is (the
preprocessing resumes and skips every cached sample).
"""

from __future__ import annotations

import logging
from pathlib import Path

from fpsa_train.data.config import DataConfig
from fpsa_train.errors import ConfigError

log = logging.getLogger(__name__)


def prepare_video_data(cfg: DataConfig, text_len: int) -> Path:
    """The cache folder for `cfg` (kind `videos`), built or completed as needed."""
    for key in ("metadata", "components", "cache_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"data.{key} is required for data.kind=videos")
    metadata = Path(cfg.metadata)
    if cfg.generate_clips > 0:
        from fpsa_train.data.synthetic_video import generate_clips

        written = generate_clips(metadata.parent, cfg.generate_clips, frames=cfg.generate_frames,
                                 fps=cfg.generate_fps, size=tuple(cfg.generate_size), seed=cfg.seed,
                                 workers=cfg.generate_workers)
        if Path(written).resolve() != metadata.resolve():
            raise ConfigError(f"data.metadata={cfg.metadata} must be {written} when data.generate_clips > 0")
    if not metadata.exists():
        raise ConfigError(f"data.metadata={cfg.metadata} does not exist: give a CSV/JSONL with video and caption "
                          "columns (or data.generate_clips=N to write synthetic clips there)")
    if cfg.build_tiny_components:
        from fpsa_train.data.tiny_models import build_tiny_wan_components

        report = build_tiny_wan_components(cfg.components, metadata if cfg.tiny_vae_steps > 0 else None,
                                           seed=cfg.seed, vae_steps=max(cfg.tiny_vae_steps, 1))
        log.info("tiny encoders in %s (VAE reconstruction PSNR %s dB)", cfg.components, report.get("psnr_db"))
    from fpsa_train.data.cache_writer import PreprocessConfig, preprocess

    preprocess(PreprocessConfig(
        metadata=str(metadata), components=str(cfg.components), out=str(cfg.cache_dir), num_frames=cfg.num_frames,
        fps=cfg.fps, start=cfg.start, buckets=[list(b) for b in cfg.buckets], text_len=text_len,
        batch_size=cfg.preprocess_batch_size, workers=cfg.preprocess_workers, latent_dtype=cfg.latent_dtype,
        seed=cfg.seed))
    return Path(cfg.cache_dir)
