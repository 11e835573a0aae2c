"""The schema of `python -m fpsa_train.evaluate` (configs/tools/evaluate.yaml), registered as `evaluate_schema`.

One evaluation compares one or more candidate deploy folders with one reference, on the same prompts, seeds and
sampler settings, so that every difference between two videos comes from the models and their attention alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fpsa_train.errors import ConfigError
from fpsa_train.sample import check_sampling_options

DENSE = "dense"
HELDOUT = "heldout"


@dataclass
class EvaluateConfig:
    candidates: list[str] = MISSING
    """Deploy folders to evaluate (written by `python -m fpsa_train.export`), e.g. `candidates=[deploy/a,deploy/b]`;
    each is named by its folder's name in the results."""
    reference: str = DENSE
    """What the candidates' videos are compared with: a deploy folder, or `dense`: the first candidate's own weights
    with FPS attention off (dense SDPA; bf16 on CUDA), i.e. the BF16 baseline the paper compares with."""
    reference_fps: bool = True
    """For a reference deploy folder: sample it with its exported schedule (true) or with dense SDPA (false)."""
    prompts: str = HELDOUT
    """`heldout` (the synthetic world's held-out prompts), a .txt file (one prompt per line; blank lines and lines
    starting with # are skipped) or a .csv file with a `prompt` column (e.g. a DiffSynth metadata.csv)."""
    max_prompts: Optional[int] = None
    """Evaluate only the first N prompts of the set (null: all of them)."""
    seeds: Optional[list[int]] = None
    """Seeds of the initial noise: one video per prompt and seed, the same noise for every model; null: the
    synthetic world's held-out seeds (fpsa_train.data.synthetic_video.HELDOUT_SEEDS)."""
    negative_prompt: Optional[str] = None
    """The guidance's negative branch; null: the components' own (model_index.json `_fpsa_negative_prompt`: "" for
    the synthetic world's), else Wan's default."""
    components: Optional[str] = None
    """Wan2.1 diffusers-format folder (vae/, text_encoder/, tokenizer/) used for every model; default: the one the
    first candidate trained with (its manifest)."""
    steps: int = 50
    """Denoising steps."""
    guidance: float = 5.0
    """Classifier-free guidance scale (1 = no guidance: one branch only)."""
    shift: float = 5.0
    """Flow shift of the sampling σ schedule."""
    height: Optional[int] = None
    """Video height in pixels (multiple of 16); default: the first candidate's training clips (manifest), else 480."""
    width: Optional[int] = None
    """Video width in pixels (multiple of 16); default: the training clips', else 832."""
    frames: Optional[int] = None
    """Frames, 4n+1; default: the training clips', else 81."""
    per_regime: bool = False
    """Also sample each candidate with every regime of its schedule forced on every step (one row per regime), so
    each regime's damage is seen alone; the exported schedule is always evaluated."""
    fp8_linears: bool = False
    """Also sample each candidate with the blocks' large Linears in FP8 (torchao, per-row scales;
    fpsa_train/fp8_linears.py), with its exported schedule: one more row per candidate, `<candidate>.fp8`, against
    the same reference (whose Linears stay bf16). `reference=<that candidate's folder>` leaves FP8 linears the only
    difference (same weights and attention). Needs torchao and a CUDA GPU of compute capability >= 8.9."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda[:N]."""
    backend: str = "auto"
    """FPS attention: auto (kernel on H100/H200, reference elsewhere), reference, kernel."""
    kernel_forward: str = "triton"
    """The FP8 kernel's inference forward for every model loaded with FPS attention (the candidates, and a reference
    folder's schedule): triton, or gluon (warp-specialised; Hopper and head dim 128 only). Part of the videos'
    inputs when not triton."""
    batch: int = 1
    """Videos denoised together (one model call per step for all of them and their negative branches): the same
    seed's prompts in order, in chunks of `batch`, identically for every variant. 1 reproduces
    `python -m fpsa_train.sample` bit for bit; a larger batch is much faster on a GPU for small models, but a
    video's last bits may then depend on its batch-mates (they are part of its reuse key), and s/step is the batch's
    step time divided by its videos."""
    out: str = "outputs/eval"
    """Folder for results.md, results.json, contact_sheet.png, plot.png and videos/ (reused by a rerun)."""
    sheet_frames: int = 4
    """Evenly spaced frames per video on the contact sheet."""
    sheet_rows: int = 8
    """Prompt × seed rows on the contact sheet (the first ones)."""
    sheet_height: int = 96
    """Height in pixels of each frame on the contact sheet (width follows the aspect ratio)."""
    vbench: bool = True
    """Compute VBench's custom-input dimensions when the vbench package and its weights are present (nothing is
    downloaded; the results say what is missing otherwise)."""

    def __post_init__(self) -> None:
        check_sampling_options(self)
        if not self.candidates:
            raise ConfigError("candidates=[] is empty: give one or more deploy folders, e.g. candidates=[deploy/tiny]")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts={self.max_prompts} must be >= 1 (or null for all prompts)")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds={list(self.seeds)}: expected distinct seeds, at least one (or null for the "
                              "held-out seeds)")
        for key in ("sheet_frames", "sheet_rows", "sheet_height", "batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
