"""Training data from a preprocessed cache (fpsa_train/preprocess.py): latents + unpadded text embeddings.

Batches never mix latent shapes: `BucketBatchSampler` groups the samples of each shape bucket, shuffles within
buckets and then the order of the batches, reseeded every epoch from (seed, epoch), so runs are reproducible and
every rank of a distributed job draws a disjoint share of the same batch list (batch j goes to rank j mod world;
every rank gets the same number of batches). Caption dropout for classifier-free guidance is decided in the
sampler too (deterministic for a seed, wherever the sample is decoded): a dropped caption is replaced by the
cached embedding of the empty prompt, as sampling with an empty negative prompt would see it.

The cache's file names live here (preprocessing writes them, training reads them). A folder without an index is
explained from its `report.json` when preprocessing ran and skipped every row, and a damaged shard is named with
the fix, so neither surfaces as a generic "no index" or a path-less safetensors error.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

from torch.utils.data import Dataset

from fpsa_train.data.sampler import ResumableBatches
from fpsa_train.models.checkpoint import open_safetensors

INDEX = "index.json"
REPORT = "report.json"
EMPTY_PROMPT = "empty_prompt.safetensors"


class CacheError(ValueError):
    """A cache folder that cannot be used as it is; the message names the file and the fix."""


def missing_index_error(root: Path) -> Exception:
    """Why `root` has no index: preprocessing never ran there, or it ran and skipped every row (an index is
    written with the first shard), in which case its report says how many rows and why."""
    report_file = root / REPORT
    try:
        report = json.loads(report_file.read_text())
    except (OSError, ValueError):  # no report (or a damaged one): nothing to explain beyond the missing index
        report = None
    if not isinstance(report, dict) or report.get("cached") != 0:
        return FileNotFoundError(f"no {INDEX} in {root}: run `python -m fpsa_train.preprocess ... out={root}` first")
    metadata, rows = report.get("metadata"), report.get("samples", 0)
    if rows == 0:
        return CacheError(f"the metadata {metadata} has no rows, so the cache {root} holds no samples; give a "
                          "metadata file that lists videos and captions")
    reasons = ", ".join(f"{n} {reason}" for reason, n in report.get("skipped_by_reason", {}).items())
    return CacheError(f"all {rows} samples of {metadata} were skipped ({reasons}): see {report_file} for each row's "
                      "reason; fix those videos and captions (or point data.metadata at good ones) and run again")


class LatentCache(Dataset):
    """Samples of a cache folder; `dataset[(i, drop_caption)]` → {"latents" (C, T, H, W), "context" (L, D), ...}."""

    def __init__(self, root: str | Path, indices: list[int] | None = None):
        self.root = Path(root)
        if not (self.root / INDEX).exists():
            raise missing_index_error(self.root)
        entries = json.loads((self.root / INDEX).read_text())["samples"]
        self.entries = entries if indices is None else [entries[i] for i in indices]
        with self._open(EMPTY_PROMPT) as f:
            self.empty_prompt = f.get_tensor("text").float()  # (L0, D)
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(e["latent_shape"]) for e in self.entries]

    def _open(self, name: str):
        fix = (f"Rebuild the cache: delete {self.root} (training builds it again from data.metadata) or run "
               "python -m fpsa_train.preprocess into a new out= folder")
        return open_safetensors(self.root / name, fix, error=CacheError)

    def _shard(self, name: str):
        if name not in self._handles:  # one open handle per shard per worker process
            self._handles[name] = self._open(name)
        return self._handles[name]

    def __getitem__(self, item) -> dict:
        i, drop = item if isinstance(item, tuple) else (item, False)
        e = self.entries[i]
        shard = self._shard(e["shard"])
        latents = shard.get_tensor(f"{e['key']}.latents").float()  # (C, T, H, W)
        context = self.empty_prompt if drop else shard.get_tensor(f"{e['key']}.text").float()  # (L, D)
        return {"latents": latents, "context": context, "prompt": i, "caption": "" if drop else e["caption"]}

    def __getstate__(self):  # file handles do not cross process boundaries
        return {**self.__dict__, "_handles": {}}


class BucketBatchSampler(ResumableBatches):
    """Batches of (index, drop_caption) within one latent-shape bucket, sharded across ranks; resumable
    mid-epoch (fpsa_train/data/sampler.py)."""

    def __init__(self, shapes: list[tuple[int, ...]], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True, caption_dropout: float = 0.0, num_replicas: int = 1, rank: int = 0):
        if not 0 <= caption_dropout < 1:
            raise ValueError(f"data.caption_dropout={caption_dropout} must be in [0, 1)")
        self.buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, shape in enumerate(shapes):
            self.buckets[tuple(shape)].append(i)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.caption_dropout, self.num_replicas, self.rank = caption_dropout, num_replicas, rank

    def _all_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for shape in sorted(self.buckets):
            idx = list(self.buckets[shape])
            if self.shuffle:
                rng.shuffle(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start: start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.num_replicas if self.num_replicas > 1 else len(batches)
        return batches[:usable]

    def _epoch_batches(self):
        rng = random.Random(self.seed * 7_919 + self.epoch)
        for j, batch in enumerate(self._all_batches()):
            drops = [rng.random() < self.caption_dropout for _ in batch]  # drawn on every rank: same stream
            if j % self.num_replicas == self.rank:
                yield list(zip(batch, drops))

    def __len__(self) -> int:
        return math.ceil(len(self._all_batches()) / self.num_replicas) if self.num_replicas > 1 \
            else len(self._all_batches())
