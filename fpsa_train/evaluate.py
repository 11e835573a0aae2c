"""`python -m fpsa_train.evaluate candidates=[deploy/a,...] [reference=dense|<deploy folder>] ...`: candidates
against a reference on the same prompts, seeds and initial noise (schema: fpsa_train/eval/config.py; the work:
fpsa_train/eval/runner.py)."""

from __future__ import annotations

from pathlib import Path

import hydra

from fpsa_train.eval.config import EvaluateConfig  # noqa: F401  (registers evaluate_schema)


@hydra.main(config_path="../configs/tools", config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    from fpsa_train.config import resolve
    from fpsa_train.eval.runner import evaluate

    results = evaluate(resolve(cfg))
    print(Path(results["files"]["results.md"]).read_text())
    print("\n".join(f"{name}: {path}" for name, path in results["files"].items()))


if __name__ == "__main__":
    main()
