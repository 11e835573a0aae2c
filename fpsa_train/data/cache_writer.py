"""The latent cache's writer: videos + captions → cached VAE latents and UMT5 text embeddings (reference/wan.md §5).

`preprocess(PreprocessConfig(...))` builds or resumes a cache that `data.cache.LatentCache` reads. It is library
code, so that `data.prepare` (the tiny default's first use) can build a cache without importing the CLI;
`python -m fpsa_train.preprocess` is its command line.

Why a cache: the Wan VAE and the UMT5-XXL encoder cost far more than a training step needs to repeat, and they
would have to sit in GPU memory beside the DiT. Every Wan trainer (musubi, DiffSynth, FastVideo) encodes once.

What is stored per clip: the VAE latent *mean*, normalised per channel with the VAE config's `latents_mean` /
`latents_std` (the 16 Wan constants for the real VAE), and the UMT5 output trimmed to the caption's real length
(unpadded; training zero-pads to 512 without a mask, as Wan does). Clips go into safetensors shards of
`shard_size` samples, each written atomically, and `index.json` (rewritten atomically after every shard) lists
each sample's shard, shapes, caption and source. A killed run therefore loses at most the unfinished shard, and
a rerun skips everything the index already holds. The empty caption's embedding is stored once
(`empty_prompt.safetensors`) for caption dropout.

Bad input never stops the run: a missing, empty, corrupt, too short or non-video file, or an empty caption, is
skipped with its reason, counted, listed in `report.json` and summarised at the end. A row that repeats an
earlier one (same video, same caption) is cached once and reported as "duplicate".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fpsa_train.atomic import atomic_path, write_text_atomic
from fpsa_train.data.cache import EMPTY_PROMPT, INDEX, REPORT
from fpsa_train.data.metadata import Sample, read_metadata
from fpsa_train.data.video import BadVideo, VideoSpec, load_clip
from fpsa_train.encoders import Encoders

log = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    """What `preprocess` encodes and how; the schema of `python -m fpsa_train.preprocess` (`preprocess_schema`)."""

    metadata: str = MISSING
    """CSV / JSONL / JSON with a video column (video, path, file_path, video_path) and a caption column
    (caption, prompt, text, cap); relative video paths are relative to the metadata file."""
    components: str = MISSING
    """A Wan2.1 diffusers-format folder with vae/, text_encoder/ and tokenizer/ (local; nothing is downloaded)."""
    out: str = MISSING
    """The cache folder (created; reruns resume in it)."""
    num_frames: int = 81
    """Frames per clip, 4n+1 (81 → 21 latent frames)."""
    fps: float = 16.0
    """Target frame rate; source frames are resampled to it."""
    start: str = "head"
    """Where the clip starts: head, uniform (middle) or random."""
    buckets: list[list[int]] = field(default_factory=lambda: [[480, 832], [832, 480], [512, 512]])
    """(height, width) buckets, multiples of 16; each video goes to the one closest in aspect ratio."""
    text_len: int = 512
    """Tokenizer max length (captions are truncated to it)."""
    batch_size: int = 4
    """Clips per VAE / text-encoder batch (within one bucket)."""
    workers: int = 2
    """Decoding worker processes."""
    shard_size: int = 64
    """Samples per safetensors shard."""
    latent_dtype: str = "bfloat16"
    """Stored dtype of latents and text embeddings: bfloat16 or float32."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    seed: int = 0
    """Seed of random clip starts."""


def sample_key(sample: Sample) -> str:
    """Stable id of a (video, caption) pair: a rerun recognises what it has done."""
    return hashlib.sha1(f"{sample.video}\0{sample.caption}".encode()).hexdigest()[:16]


def split_duplicates(samples: list[Sample]) -> tuple[list[Sample], list[dict]]:
    """The first row of every (video, caption) pair, and a skip entry (reason "duplicate") for each repeat.

    Why: a repeated row has the same key, so it would be stored twice under one name and listed twice in the
    index, and training would draw it twice as often, a weighting nobody asked for. The same video with another
    caption is another sample and is kept."""
    first: dict[str, Sample] = {}
    duplicates = []
    for s in samples:
        key = sample_key(s)
        if key in first:
            duplicates.append({"row": s.index, "source": str(s.video), "reason": "duplicate",
                               "detail": f"same video and caption as row {first[key].index}, which is cached once"})
        else:
            first[key] = s
    return list(first.values()), duplicates


class _Clips(Dataset):
    """Decodes clips in worker processes; failures come back as a reason instead of an exception."""

    def __init__(self, samples: list[Sample], spec: VideoSpec, seed: int):
        self.samples, self.spec, self.seed = samples, spec, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        if not s.caption.strip():
            return {"i": i, "clip": None, "reason": "empty_caption", "detail": "caption is empty"}
        try:
            clip = load_clip(s.video, self.spec, seed=self.seed + s.index)  # (C, T, H, W) in [-1, 1]
        except BadVideo as err:
            return {"i": i, "clip": None, "reason": err.reason, "detail": err.detail}
        except Exception as err:  # noqa: BLE001  a decoder crash on one file must not end the run
            return {"i": i, "clip": None, "reason": "corrupt", "detail": f"{type(err).__name__}: {err}"}
        return {"i": i, "clip": clip, "reason": None, "detail": None}


def _atomic_json(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _atomic_safetensors(path: Path, tensors: dict) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)


def spec_of(cfg: PreprocessConfig) -> dict:
    """What must match for a cache to be resumed (anything else would mix incompatible samples)."""
    return {"num_frames": cfg.num_frames, "fps": cfg.fps, "start": cfg.start,
            "buckets": [list(b) for b in cfg.buckets], "components": str(Path(cfg.components).resolve()),
            "text_len": cfg.text_len, "latent_dtype": cfg.latent_dtype}


def load_index(out: Path, spec: dict) -> dict:
    if not (out / INDEX).exists():
        return {"spec": spec, "samples": []}
    index = json.loads((out / INDEX).read_text())
    old = index["spec"]
    differ = [f"{k}={old.get(k)!r} (now {spec[k]!r})" for k in spec if old.get(k) != spec[k]]
    if differ:
        raise ValueError(f"cache {out} was built with other settings: {', '.join(differ)}; use another out= folder "
                         "or the same settings")
    return index


def preprocess(cfg: PreprocessConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_of(cfg)
    index = load_index(out, spec)
    done = {e["key"] for e in index["samples"]}
    samples = read_metadata(cfg.metadata)
    unique, duplicates = split_duplicates(samples)
    todo = [s for s in unique if sample_key(s) not in done]
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.latent_dtype]
    log.info("%d samples in %s (%d duplicate rows): %d cached, %d to do (device %s)", len(samples), cfg.metadata,
             len(duplicates), len(unique) - len(todo), len(todo), device)
    enc = Encoders(cfg.components, device, cfg.text_len)
    if not (out / EMPTY_PROMPT).exists():
        _atomic_safetensors(out / EMPTY_PROMPT, {"text": enc.text([""])[0].to(dtype)})

    video_spec = VideoSpec(cfg.num_frames, cfg.fps, cfg.start, tuple(tuple(b) for b in cfg.buckets))
    loader = DataLoader(_Clips(todo, video_spec, cfg.seed), batch_size=None, num_workers=cfg.workers,
                        prefetch_factor=4 if cfg.workers else None)
    for d in duplicates:
        log.warning("skipped row %d (%s): duplicate: %s", d["row"], d["source"], d["detail"])
    failed: list[dict] = []  # rows whose video or caption could not be used
    pending: dict[tuple, list] = defaultdict(list)  # bucket shape → decoded samples waiting for a full batch
    shard: dict[str, torch.Tensor] = {}
    shard_entries: list[dict] = []
    next_shard = 1 + max([int(p.stem.split("_")[1]) for p in out.glob("shard_*.safetensors")], default=-1)

    def encode(batch: list[dict]) -> None:
        nonlocal shard, shard_entries, next_shard
        clips = torch.stack([b["clip"] for b in batch])  # (B, 3, T, H, W)
        latents = enc.latents(clips)
        texts = enc.text([todo[b["i"]].caption for b in batch])
        for b, lat, txt in zip(batch, latents, texts):
            s = todo[b["i"]]
            key = sample_key(s)
            shard[f"{key}.latents"], shard[f"{key}.text"] = lat.to(dtype), txt.to(dtype)
            shard_entries.append({"key": key, "latent_shape": list(lat.shape), "text_len": int(txt.shape[0]),
                                  "caption": s.caption, "source": str(s.video), "row": s.index})
        if len(shard_entries) >= cfg.shard_size:
            flush()

    def flush() -> None:
        nonlocal shard, shard_entries, next_shard
        if not shard_entries:
            return
        name = f"shard_{next_shard:05d}.safetensors"
        _atomic_safetensors(out / name, shard)  # the shard first, then the index that points into it
        index["samples"].extend({**e, "shard": name} for e in shard_entries)
        _atomic_json(out / INDEX, index)
        shard, shard_entries, next_shard = {}, [], next_shard + 1

    for item in tqdm(loader, total=len(todo), desc="preprocess", unit="clip", dynamic_ncols=True):
        if item["clip"] is None:
            s = todo[item["i"]]
            failed.append({"row": s.index, "source": str(s.video), "reason": item["reason"], "detail": item["detail"]})
            log.warning("skipped row %d (%s): %s: %s", s.index, s.video, item["reason"], item["detail"])
            continue
        bucket = tuple(item["clip"].shape)
        pending[bucket].append(item)
        if len(pending[bucket]) == cfg.batch_size:
            encode(pending.pop(bucket))
    for batch in pending.values():
        encode(batch)
    flush()

    skipped = sorted(duplicates + failed, key=lambda s: s["row"])
    reasons = Counter(s["reason"] for s in skipped)
    report = {"metadata": str(cfg.metadata), "samples": len(samples), "cached": len(index["samples"]),
              "encoded_now": len(todo) - len(failed), "skipped": len(skipped), "skipped_by_reason": dict(reasons),
              "skipped_samples": skipped}
    _atomic_json(out / REPORT, report)
    log.info("cache %s: %d samples cached (%d new), %d skipped %s; report: %s", out, report["cached"],
             report["encoded_now"], len(skipped), dict(reasons) or "", out / REPORT)
    return report
