"""The prompt set and seeds of an evaluation, and each prompt's stable short id.

Prompts come from the synthetic world (`heldout`: combinations of attributes no training clip showed, so prompt
accuracy measures composition, not recall), a text file or a CSV. Each prompt gets a short hash for file names:
the video of a prompt keeps its name whatever the prompt's position in the set, so a rerun with a reordered or
extended set still finds it.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from fpsa_train.errors import ConfigError
from fpsa_train.eval.config import HELDOUT, EvaluateConfig


def prompt_id(prompt: str) -> str:
    """12 hex digits of the prompt's sha256: its name in file names."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def load_prompts(cfg: EvaluateConfig) -> list[str]:
    """The prompts of `cfg.prompts` (first `max_prompts`), duplicates removed in order."""
    if cfg.prompts == HELDOUT:
        from fpsa_train.data.synthetic_video import heldout_prompts

        prompts = heldout_prompts()
    else:
        prompts = _read_prompt_file(Path(cfg.prompts))
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ConfigError(f"prompts={cfg.prompts!r} holds no prompt")
    return prompts[: cfg.max_prompts] if cfg.max_prompts else prompts


def _read_prompt_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"prompts={str(path)!r} is not a file: give `heldout`, a .txt file (one prompt per line) or "
                          "a .csv file with a `prompt` column")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "prompt" not in (reader.fieldnames or []):
                raise ConfigError(f"prompts={str(path)!r}: no `prompt` column (columns: {reader.fieldnames})")
            return [row["prompt"].strip() for row in reader if (row["prompt"] or "").strip()]
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_seeds(cfg: EvaluateConfig) -> list[int]:
    """`cfg.seeds`, else the synthetic world's held-out seeds."""
    if cfg.seeds is not None:
        return [int(s) for s in cfg.seeds]
    from fpsa_train.data.synthetic_video import HELDOUT_SEEDS

    return list(HELDOUT_SEEDS)
