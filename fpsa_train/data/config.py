"""The data schema: what clips training sees and where they come from (`data.*` in the training config).

`DataConfig` lives here, beside the code that reads it (the synthetic latents, the video cache, the DataModule), so
the data package never imports the training schema (fpsa_train/config.py), which composes it with the other groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fpsa_train.errors import ConfigError


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """`videos`: a folder of videos + captions, preprocessed once into a cache of latents and text embeddings;
    `synthetic`: structured latents and text embeddings generated in-process (fast tests)."""
    num_samples: int = 512
    """synthetic: training samples per epoch."""
    val_samples: int = 32
    """Validation samples (fixed noise and σ). videos: the last `val_samples` cached clips are held out."""
    num_prompts: int = 8
    """synthetic: distinct captions; each one fixes the colour and motion of its clips."""
    latent_channels: int = 16
    """Latent channels (Wan VAE: 16)."""
    latent_frames: int = 5
    """synthetic: latent frames T (pixel frames 4·(T−1)+1)."""
    latent_height: int = 16
    """synthetic: latent height (pixel height / 8)."""
    latent_width: int = 16
    """synthetic: latent width (pixel width / 8)."""
    text_tokens: int = 16
    """synthetic: longest caption in tokens (unpadded; the collate zero-pads to model.text_len)."""
    text_dim: int = 4096
    """Width of the text embeddings (must equal model.text_dim)."""
    batch_size: int = 4
    """Samples per batch per device (one latent shape per batch)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    seed: int = 1234
    """Seed of the data (generation, shuffling, caption dropout), independent of the training seed."""
    metadata: Optional[str] = None
    """videos: CSV / JSONL / JSON with video and caption columns (paths relative to the file or absolute)."""
    components: Optional[str] = None
    """videos: a Wan2.1 diffusers-format folder with vae/, text_encoder/, tokenizer/ (local)."""
    cache_dir: Optional[str] = None
    """videos: where the preprocessed cache lives (built on first use, then reused)."""
    num_frames: int = 81
    """videos: frames per clip, 4n+1."""
    fps: float = 16.0
    """videos: target frame rate (source frames are resampled)."""
    start: str = "head"
    """videos: clip start: head, uniform or random."""
    buckets: list[list[int]] = field(default_factory=lambda: [[480, 832], [832, 480], [512, 512]])
    """videos: (height, width) buckets, multiples of 16."""
    caption_dropout: float = 0.1
    """videos: probability that a training caption is replaced by the empty prompt (for classifier-free guidance)."""
    latent_dtype: str = "bfloat16"
    """videos: dtype of the cached latents and text embeddings."""
    preprocess_batch_size: int = 4
    """videos: clips per encoder batch when building the cache."""
    preprocess_workers: int = 2
    """videos: decoding processes when building the cache."""
    generate_clips: int = 0
    """videos: write this many synthetic captioned clips to the metadata's folder first (the tiny default)."""
    generate_frames: int = 25
    """videos, generate_clips > 0: frames per generated clip (resampled from generate_fps to `fps` when cached)."""
    generate_fps: float = 24.0
    """videos, generate_clips > 0: frame rate of the generated clips."""
    generate_size: list[int] = field(default_factory=lambda: [128, 128])
    """videos, generate_clips > 0: (height, width) of the generated clips, even numbers."""
    generate_workers: int = 1
    """videos, generate_clips > 0: processes rendering and encoding the clips (the files do not depend on it)."""
    build_tiny_components: bool = False
    """videos: build the tiny VAE / UMT5 / tokenizer into `components` first (the tiny default)."""
    tiny_vae_steps: int = 300
    """videos: training steps of the tiny VAE on the clips (0 = untrained, for fast tests)."""

    def clip_size(self) -> tuple[int, int, int]:
        """(height, width, frames) in pixels of the training clips: the first bucket for videos; for synthetic
        latents the pixel size they stand for (Wan's VAE: 8× in space, 4× in time)."""
        if self.kind == "videos":
            (height, width), frames = self.buckets[0], self.num_frames
        else:
            height, width, frames = 8 * self.latent_height, 8 * self.latent_width, 4 * (self.latent_frames - 1) + 1
        return int(height), int(width), int(frames)

    def latent_grids(self) -> list[tuple[int, int, int]]:
        """Latent (frames, height, width) of every clip shape training can see: one per bucket for videos (Wan's
        VAE: 4× in time, 8× in space), the configured one for synthetic latents."""
        if self.kind != "videos":
            return [(self.latent_frames, self.latent_height, self.latent_width)]
        return [((self.num_frames - 1) // 4 + 1, int(h) // 8, int(w) // 8) for h, w in self.buckets]

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "videos"):
            raise ConfigError(f"data.kind={self.kind!r}: expected synthetic or videos")
        for name in ("num_samples", "val_samples", "num_prompts", "latent_channels", "latent_frames",
                     "latent_height", "latent_width", "text_tokens", "text_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.kind == "videos":
            for key in ("metadata", "components", "cache_dir"):
                if not getattr(self, key):
                    raise ConfigError(f"data.{key} is required for video data: data.metadata=<CSV/JSONL of videos and "
                                      "captions>, data.components=<Wan2.1 diffusers folder>, data.cache_dir=<cache>")
        if (self.num_frames - 1) % 4:
            raise ConfigError(f"data.num_frames={self.num_frames} must be 4n+1 (e.g. 17, 49, 81)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"data.caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.start not in ("head", "uniform", "random"):
            raise ConfigError(f"data.start={self.start!r}: expected head, uniform or random")
        for b in self.buckets:
            if len(b) != 2 or any(int(x) % 16 or int(x) < 16 for x in b):
                raise ConfigError(f"data.buckets entry {list(b)}: expected [height, width], multiples of 16")
        if len(self.generate_size) != 2 or any(int(x) % 2 or int(x) < 16 for x in self.generate_size):
            raise ConfigError(f"data.generate_size={list(self.generate_size)}: expected [height, width], even, >= 16")
        if self.generate_frames < 1 or self.generate_fps <= 0:
            raise ConfigError(f"data.generate_frames={self.generate_frames} must be >= 1 and "
                              f"data.generate_fps={self.generate_fps} > 0")
