"""Preprocess videos + captions into cached latents and text embeddings (reference/wan.md §5).

`python -m fpsa_train.preprocess metadata=clips/metadata.csv components=/data/Wan2.1-T2V-1.3B-Diffusers out=cache`

The command line of `data.cache_writer.preprocess`, which holds the cache format and its writer (why a cache,
what is stored per clip, how a killed run resumes, how bad input is reported); the names below are re-exported
from there, and `Encoders` from `fpsa_train.encoders`, so `from fpsa_train.preprocess import ...` still works.
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore

from fpsa_train.data.cache_writer import (  # noqa: F401  re-exported: their old home
    PreprocessConfig, _Clips, load_index, preprocess, sample_key, spec_of, split_duplicates)
from fpsa_train.encoders import Encoders  # noqa: F401  re-exported: its old home

ConfigStore.instance().store(name="preprocess_schema", node=PreprocessConfig)


@hydra.main(config_path="../configs/tools", config_name="preprocess", version_base="1.3")
def main(cfg) -> None:
    from fpsa_train.config import resolve

    preprocess(resolve(cfg))


if __name__ == "__main__":
    main()
