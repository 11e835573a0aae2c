"""`python -m fpsa_train +experiment=tiny|wan1_3b|wan14b [overrides]`: train (Hydra entry point)."""

import hydra
from omegaconf import DictConfig

import fpsa_train.config  # noqa: F401  (registers the config schema)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from fpsa_train.train import train

    metrics = train(cfg)
    print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
