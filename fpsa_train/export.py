"""`python -m fpsa_train.export checkpoint=... out=...`: a training checkpoint → a deploy folder (fpsa_train/deploy.py).

Input: a Lightning checkpoint file (`last.ckpt`, `stepNNNNNNN.ckpt`), a DeepSpeed ZeRO checkpoint folder (what
Lightning's DeepSpeed strategy writes under the same names; consolidated from its fp32 partitions), or the single
file Lightning's `convert_zero_checkpoint_to_fp32_state_dict` makes of one, all read by
lit/training_checkpoint.py. Every checkpoint fpsa writes carries its run config (architecture, token order, tile
shape, schedule, clip size: `FlowMatchingModule.run_config`), so the checkpoint is all export needs. Files are read
with `torch.load(weights_only=True)`: nothing is unpickled.

Output: the deploy folder, written into a temporary sibling and renamed into place at the end
(fpsa_train/atomic.py `replacing_dir`), so a killed or failed export never leaves a half folder under the final
name (and `overwrite=true` replaces an old export only once the new one is complete). The sibling's name records
the writer (`.{out}.tmp-<host>-<pid>-<random>`): a killed export's leftover, whose process is gone, is removed by
the next export to the same `out` (before it writes, to free the space, and after), while a concurrent export's is
left alone. The EMA weights are exported by default when the checkpoint has them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from safetensors.torch import save_file

from fpsa_train.atomic import remove_stale_siblings, replacing_dir
from fpsa_train.config import ConfigError
from fpsa_train.deploy import (FORMAT, FORMAT_VERSION, MANIFEST, MANIFEST_SHA256, SCHEDULE, SELECTOR_PREFIX,
                               SELECTORS, file_entries, kernel_features, manifest_sha256, model_config)
from fpsa_train.fps.schedule import FPSConfig, Schedule, fps_enabled, schedule_from_data
from fpsa_train.lit.config import weight_choice
from fpsa_train.lit.training_checkpoint import (RUN_CONFIG_KEY, TrainingCheckpoint, pick_weights,
                                                read_training_checkpoint)
from fpsa_train.models.checkpoint import write_wan_weights
from fpsa_train.models.checkpoint_config import CheckpointError
from fpsa_train.models.config import WanConfig
from fpsa_train.models.state_dict import KEY_FORMATS
from fpsa_train.models.wan import WanModel

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    """A Lightning checkpoint file, a DeepSpeed ZeRO checkpoint folder, or a consolidated DeepSpeed file."""
    out: str = MISSING
    """The deploy folder to write (must not exist unless overwrite=true)."""
    key_format: str = "original"
    """Weight key names: `original` (Wan's) or `diffusers` (WanTransformer3DModel; loadable by WanPipeline)."""
    weights: str = "auto"
    """`auto`: the EMA weights when the checkpoint has them, else the live (trained) weights; `ema`; `live`
    (lit/config.py WEIGHT_CHOICES; `model`, the old spelling of live, is accepted with a warning)."""
    dtype: str = "bfloat16"
    """Stored dtype of the weights: bfloat16 (deployment) or float32."""
    max_shard_gb: float = 5.0
    """Weights above this size (GiB) are split into shards with an index."""
    schedule_file: Optional[str] = None
    """A schedule YAML/JSON (`regimes:`) to export instead of the checkpoint's (e.g. a calibrated one)."""
    overwrite: bool = False
    """Replace an existing `out` (only once the new export is complete)."""

    def __post_init__(self) -> None:
        if self.key_format not in KEY_FORMATS:
            raise ConfigError(f"key_format={self.key_format!r}: expected one of {KEY_FORMATS}")
        self.weights = weight_choice(self.weights, "weights")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {tuple(DTYPES)}")
        if not self.max_shard_gb > 0:
            raise ConfigError(f"max_shard_gb={self.max_shard_gb} must be > 0")


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def _run_config(ckpt: TrainingCheckpoint) -> dict:
    if not isinstance(ckpt.run_config, dict):
        raise CheckpointError(f"{ckpt.path}: no `{RUN_CONFIG_KEY}` in the checkpoint (architecture and schedule); it "
                              "was not written by fpsa's training, or by a version before export existed")
    return ckpt.run_config


def expected_bytes(cfg: WanConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the exported weight tensors for an architecture (meta shapes; safetensors headers not counted)."""
    with torch.device("meta"):
        sd = WanModel(cfg).state_dict()
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size()) for t in sd.values())


def export(cfg: ExportConfig) -> dict:
    """Write the deploy folder; returns what was written (paths, bytes, seconds, provenance)."""
    started = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"out={str(out)!r} exists; choose another folder or pass overwrite=true")
    ckpt = read_training_checkpoint(cfg.checkpoint)
    run = _run_config(ckpt)
    arch = model_config(run)
    schedule = _schedule(run, arch, cfg.schedule_file)
    state, which = pick_weights(ckpt, cfg.weights)
    wan = {k: v for k, v in state.items() if SELECTOR_PREFIX not in k}
    selectors = _selectors(state, schedule, arch.num_layers)
    log.info("exporting %s weights of %s (%s, step %s) to %s", which, cfg.checkpoint, ckpt.kind, ckpt.global_step, out)

    remove_stale_siblings(out)  # a killed export's weights may take the space this one needs
    with replacing_dir(out) as tmp:
        write_wan_weights(wan, tmp, key_format=cfg.key_format, cfg=arch, dtype=DTYPES[cfg.dtype],
                          max_shard_bytes=int(cfg.max_shard_gb * 2**30))
        if selectors:  # small; kept in fp32 (a threshold, not a weight)
            save_file({k: v.detach().float().contiguous() for k, v in selectors.items()}, str(tmp / SELECTORS))
        _write_json(tmp / SCHEDULE, schedule.to_dict() if schedule is not None else {"regimes": []})
        for f in tmp.iterdir():  # safetensors writes 0600; a deploy folder is meant to be shared and read
            f.chmod(0o644)
        files = file_entries(tmp)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "key_format": cfg.key_format, "dtype": cfg.dtype, "model": run["model"],
            "kernel": kernel_features(arch, schedule),
            "sampling": {"num_train_timesteps": run.get("num_train_timesteps", 1000), "video": run.get("video"),
                         "components": run.get("components"), "train_shift": run.get("train_shift")},
            "source": {"checkpoint": str(Path(cfg.checkpoint).resolve()), "kind": ckpt.kind,
                       "global_step": ckpt.global_step, "weights": which,
                       "schedule": str(cfg.schedule_file) if cfg.schedule_file else "checkpoint"},
            "files": files,
        }
        manifest[MANIFEST_SHA256] = manifest_sha256(manifest)  # the runtime reads the manifest too: cover it
        _write_json(tmp / MANIFEST, manifest)
    report = {"out": str(out), "weights": which, "key_format": cfg.key_format, "dtype": cfg.dtype,
              "files": sorted(files), "bytes": sum(f["bytes"] for f in files.values()),
              "seconds": round(time.perf_counter() - started, 3)}
    log.info("export written: %s", report)
    return report


def _schedule(run: dict, arch: WanConfig, schedule_file: str | None) -> Schedule | None:
    if schedule_file:  # from_config reads and validates the file
        fps = FPSConfig(schedule_file=schedule_file)
        if not fps_enabled(fps):  # `enabled: false` (configs/fps/dense.yaml): a dense deploy
            return None
        return Schedule.from_config(fps, tuple(arch.tile_shape))
    return schedule_from_data(run.get("schedule"), tuple(arch.tile_shape))


def _selectors(state: dict[str, torch.Tensor], schedule: Schedule | None, num_layers: int) -> dict:
    """The trained selectors of the exported schedule's learned regimes (a `schedule_file` may drop or rename
    regimes): every layer must have them."""
    learned = [r.name for r in schedule.regimes if r.pattern == "learned"] if schedule is not None else []
    out = {k: v for k, v in state.items() if any(f".{SELECTOR_PREFIX}selectors.{n}." in k for n in learned)}
    missing = [f"blocks.{i}.{SELECTOR_PREFIX}selectors.{n}" for n in learned for i in range(num_layers)
               if not any(k.startswith(f"blocks.{i}.{SELECTOR_PREFIX}selectors.{n}.") for k in out)]
    if missing:
        raise CheckpointError(f"the schedule's learned regimes have no trained selectors in the checkpoint: "
                              f"{missing[:10]}; export the schedule the run trained with")
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


@hydra.main(config_path="../configs/tools", config_name="export", version_base="1.3")
def main(cfg) -> None:
    from fpsa_train.config import resolve

    report = export(resolve(cfg))
    print(f"deploy folder: {report['out']} ({report['bytes'] / 2**20:.1f} MiB, {report['weights']} weights, "
          f"{report['key_format']} keys, {report['seconds']:.2f} s)")


if __name__ == "__main__":
    main()
