"""Data pipeline throughput for the embedded tiny setup: decode (clips/s), preprocess (clips/s), cache bytes per clip.

    python scripts/bench_data.py            # after `python -m fpsa_train +experiment=tiny` built .fpsa_data/tiny

Decode: every clip of the metadata through `load_clip` (decord, fps resampling, resize/crop to the bucket), in
this process and through a DataLoader with `--workers` processes. Preprocess: a fresh cache in a temporary folder
with the tiny encoders (decode workers + VAE + UMT5 on the CPU), timed end to end. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from fpsa_train.data.metadata import read_metadata
from fpsa_train.data.video import VideoSpec, load_clip
from fpsa_train.preprocess import PreprocessConfig, _Clips, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".fpsa_data/tiny", help="folder with clips/metadata.csv and components/")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(args.root)
    metadata = root / "clips" / "metadata.csv"
    samples = read_metadata(metadata)
    spec = VideoSpec(num_frames=args.frames, fps=16.0, buckets=((args.size, args.size),))

    t0 = time.perf_counter()
    for s in samples:
        load_clip(s.video, spec)
    decode_1 = len(samples) / (time.perf_counter() - t0)

    loader = DataLoader(_Clips(samples, spec, seed=0), batch_size=None, num_workers=args.workers)
    t0 = time.perf_counter()
    decoded = sum(item["clip"] is not None for item in loader)
    decode_w = decoded / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = PreprocessConfig(metadata=str(metadata), components=str(root / "components"), out=tmp,
                               num_frames=args.frames, buckets=[[args.size, args.size]], workers=args.workers,
                               latent_dtype="float32", device="cpu")
        t0 = time.perf_counter()
        preprocess(cfg)
        seconds = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).glob("shard_*.safetensors"))

    print(f"| clips | decode, 1 process | decode, {args.workers} workers | preprocess ({args.workers} workers) "
          "| cache per clip | host |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(samples)} × {args.frames} frames at {args.size}² | {decode_1:.1f} clips/s | {decode_w:.1f} clips/s "
          f"| {len(samples) / seconds:.2f} clips/s ({seconds:.1f} s) | {size / len(samples) / 1024:.1f} KiB "
          f"| {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads |")


if __name__ == "__main__":
    main()
