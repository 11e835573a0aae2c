"""Bucketed, sharded, seeded batches over the cache; the tiny default runs clips → cache → training; a cache
where every row was skipped is explained from its report."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch

from fpsa_train.data.cache import BucketBatchSampler, CacheError, LatentCache
from fpsa_train.train import train
from tests.conftest import compose_train
from tests.data.conftest import BAD_ROWS, write_metadata

SHAPES = [(16, 5, 16, 16)] * 10 + [(16, 5, 12, 20)] * 7 + [(16, 3, 16, 16)] * 5


def batches(**kw) -> list[list[tuple[int, bool]]]:
    return list(BucketBatchSampler(SHAPES, 3, **kw))


def test_batches_never_mix_shapes_and_drop_last():
    out = batches(seed=0)
    assert all(len({SHAPES[i] for i, _ in b}) == 1 and len(b) == 3 for b in out)
    assert len(out) == 10 // 3 + 7 // 3 + 5 // 3
    every = batches(seed=0, drop_last=False, shuffle=False)
    assert sorted(i for b in every for i, _ in b) == list(range(len(SHAPES)))


def test_seeded_per_epoch_and_reproducible():
    s = BucketBatchSampler(SHAPES, 3, seed=5)
    first = list(s)
    assert first == list(BucketBatchSampler(SHAPES, 3, seed=5))
    s.set_epoch(1)
    assert list(s) != first


def test_distributed_ranks_get_disjoint_equal_shares():
    ranks = [list(BucketBatchSampler(SHAPES, 2, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(BucketBatchSampler(SHAPES, 2, seed=3, num_replicas=2, rank=0))
    seen = [i for b in ranks[0] + ranks[1] for i, _ in b]
    assert len(seen) == len(set(seen))


def test_caption_dropout_rate_and_determinism():
    shapes = [(16, 5, 16, 16)] * 4000
    drops = [d for b in BucketBatchSampler(shapes, 8, seed=1, caption_dropout=0.1) for _, d in b]
    assert abs(sum(drops) / len(drops) - 0.1) < 0.02
    again = [d for b in BucketBatchSampler(shapes, 8, seed=1, caption_dropout=0.1) for _, d in b]
    assert drops == again
    assert not any(d for b in BucketBatchSampler(shapes, 8, caption_dropout=0.0) for _, d in b)


def test_tiny_experiment_runs_from_clips_to_training(tmp_path):
    base = tmp_path / "data"
    overrides = ["+experiment=tiny", f"data.metadata={base}/clips/metadata.csv", f"data.components={base}/components",
                 f"data.cache_dir={base}/cache", "data.generate_clips=12", "data.build_tiny_components=true",
                 "data.tiny_vae_steps=0",
                 "data.val_samples=4", "trainer.max_steps=12", "trainer.val_every_n_steps=6", "fps=dense"]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    assert metrics["steps"] == 12 and torch.isfinite(torch.tensor(metrics["val/loss_end"]))
    report = (base / "cache" / "report.json").read_text()
    assert '"cached": 12' in report
    second = train(compose_train(overrides, tmp_path / "run2"))  # the cache is reused, not rebuilt
    assert '"encoded_now": 0' in (base / "cache" / "report.json").read_text()
    assert second["steps"] == 12
    assert Counter(p.suffix for p in (base / "cache").iterdir())[".safetensors"] >= 2


def test_training_when_every_row_was_skipped_names_the_count_and_the_report(video_root, tmp_path):
    """Before: preprocessing skipped every row, wrote no index, and training then failed with "no index.json in
    <cache>: run `python -m fpsa_train.preprocess ...` first", although it had just run."""
    metadata = write_metadata(video_root / "all_bad.csv", [row for row, _ in BAD_ROWS])
    cache = tmp_path / "cache"
    overrides = ["+experiment=tiny", "data=videos", f"data.metadata={metadata}",
                 f"data.components={video_root / 'components'}", f"data.cache_dir={cache}", "data.num_frames=17",
                 "data.buckets=[[128,128]]", "data.preprocess_workers=0", "trainer.max_steps=2", "fps=dense"]
    report = re.escape(str(cache / "report.json"))
    with pytest.raises(CacheError, match=rf"^all {len(BAD_ROWS)} samples of \S+all_bad\.csv were skipped "
                                         rf"\(1 missing, 1 empty_file, .*\): see {report} for each row's reason"):
        train(compose_train(overrides, tmp_path / "run"))


def test_a_folder_without_an_index_says_whether_preprocessing_ran(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no index\.json in .*: run `python -m fpsa_train\.preprocess"):
        LatentCache(tmp_path)  # never preprocessed
    (tmp_path / "report.json").write_text(json.dumps({"metadata": "clips.csv", "samples": 0, "cached": 0}))
    with pytest.raises(CacheError, match=r"^the metadata clips\.csv has no rows, so the cache .* holds no samples"):
        LatentCache(tmp_path)
