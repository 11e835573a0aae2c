"""DataModule: the configured data (cached videos or in-process synthetic latents), batched with captions
zero-padded to the model's text length (no mask, as Wan trains).

Cached videos: `prepare_data` (rank 0 only) builds or completes the cache (fpsa_train/data/prepare.py); `setup`
splits it (the last `val_samples` clips are held out) and batches within one latent shape through
`BucketBatchSampler`, which also shards batches across ranks and decides caption dropout.

Both kinds shard by data-parallel rank (the `sp_size` ranks of a sequence-parallel group read the same batch)
and resume mid-epoch: every checkpoint stores the epoch and how many of its batches this rank's training loop
has consumed (`state_dict`, saved by Lightning with the DataModule), and the restored sampler skips them
(fpsa_train/data/sampler.py).
"""

from __future__ import annotations

import functools

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from fpsa_train.data.config import DataConfig
from fpsa_train.data.sampler import ShardedBatchSampler
from fpsa_train.data.synthetic import SyntheticLatents, collate
from fpsa_train.errors import ConfigError
from fpsa_train.sequence_parallel import dp_coordinates


class LatentDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, text_len: int, sp_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.text_len = text_len
        self.sp_size = sp_size
        self.collate = functools.partial(collate, text_len=text_len)
        self._prepared = False
        self._resume: dict | None = None

    def _dp(self) -> tuple[int, int]:
        """(data-parallel size, rank): sequence-parallel groups are consecutive ranks (sequence_parallel.py)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        dp_rank, dp_size, _ = dp_coordinates(rank, world, self.sp_size)
        return dp_size, dp_rank

    def state_dict(self) -> dict:
        """Where the training data stands: the epoch and the batches of it this rank has trained on."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"epoch": trainer.current_epoch,
                "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def prepare_data(self) -> None:
        # Lightning calls this before every fit/validate; the cache check (and its log lines) runs once.
        if self.cfg.kind == "videos" and not self._prepared:
            from fpsa_train.data.prepare import prepare_video_data

            prepare_video_data(self.cfg, self.text_len)
            self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.cfg.kind == "synthetic":
            self.train_set = SyntheticLatents(self.cfg, "train")
            self.val_set = SyntheticLatents(self.cfg, "val")
            return
        from fpsa_train.data.cache import LatentCache

        n = len(LatentCache(self.cfg.cache_dir))
        n_val = min(self.cfg.val_samples, n // 2)
        if n - n_val < self.cfg.batch_size:
            raise ConfigError(f"the cache {self.cfg.cache_dir} holds {n} clips: too few for data.batch_size="
                              f"{self.cfg.batch_size} with {n_val} held out for validation")
        self.train_set = LatentCache(self.cfg.cache_dir, list(range(n - n_val)))
        self.val_set = LatentCache(self.cfg.cache_dir, list(range(n - n_val, n)))
        dim = self.train_set[0]["context"].shape[-1]
        if dim != self.cfg.text_dim:
            raise ConfigError(f"the cache's text embeddings are {dim} wide but data.text_dim={self.cfg.text_dim} "
                              "(model.text_dim): the text encoder in data.components does not fit the model")

    def _loader(self, dataset, train: bool) -> DataLoader:
        dp_size, dp_rank = self._dp()
        if self.cfg.kind == "videos":
            from fpsa_train.data.cache import BucketBatchSampler

            sampler = BucketBatchSampler(
                dataset.shapes(), self.cfg.batch_size, shuffle=train, seed=self.cfg.seed, drop_last=train,
                caption_dropout=self.cfg.caption_dropout if train else 0.0, num_replicas=dp_size, rank=dp_rank)
        else:
            sampler = ShardedBatchSampler(len(dataset), self.cfg.batch_size, shuffle=train, seed=self.cfg.seed,
                                          drop_last=train, num_replicas=dp_size, rank=dp_rank)
        if train and self._resume:
            # Lightning creates the first iterator before its set_epoch call (worker processes draw batches at
            # once), so the resumed epoch is set here too
            sampler.set_epoch(self._resume["epoch"])
            sampler.resume_at(self._resume["epoch"], self._resume["batches"])
            self._resume = None
        return DataLoader(dataset, batch_sampler=sampler, num_workers=self.cfg.num_workers, collate_fn=self.collate,
                          persistent_workers=self.cfg.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)


def validation_batch(cfg: DataConfig, text_len: int, n: int) -> dict:
    """The first `n` validation samples of the configured data as one batch (building a video cache if needed)."""
    data = LatentDataModule(cfg, text_len)
    data.prepare_data()
    data.setup()
    shape = data.val_set[0]["latents"].shape
    same = [s for s in (data.val_set[i] for i in range(len(data.val_set))) if s["latents"].shape == shape][:n]
    if len(same) < n:
        raise ConfigError(f"asked for {n} validation clips of one shape; the data holds {len(same)} "
                          "(raise data.val_samples)")
    return collate(same, text_len)
