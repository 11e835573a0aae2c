"""DataModule: the configured data set, batched with captions zero-padded to the model's text length."""

from __future__ import annotations

import functools

import lightning as L
from torch.utils.data import DataLoader

from fpsa_train.config import DataConfig
from fpsa_train.data.synthetic import SyntheticLatents, collate


class LatentDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, text_len: int):
        super().__init__()
        self.cfg = cfg
        self.collate = functools.partial(collate, text_len=text_len)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = SyntheticLatents(self.cfg, "train")
        self.val_set = SyntheticLatents(self.cfg, "val")

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.cfg.num_workers, collate_fn=self.collate,
                          persistent_workers=self.cfg.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
