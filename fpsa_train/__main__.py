"""`python -m fpsa_train +experiment=tiny|wan1_3b|wan14b [overrides]`: train (Hydra entry point)."""

import sys

import hydra
from omegaconf import DictConfig

import fpsa_train.config  # noqa: F401  (registers the config schema)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fpsa_train.lit.checkpointing import PREEMPTED_EXIT_CODE, Preempted
    from fpsa_train.train import train

    try:
        metrics = train(cfg)
    except Preempted as stop:  # a checkpoint was written; a non-zero status tells schedulers it is not finished
        print(stop, file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
