"""config.json of a Wan checkpoint: read it (original or diffusers fields), check it against the model config,
write it for an export.

The original `config.json` carries dim/num_heads/...; diffusers' carries num_attention_heads/attention_head_dim/
in_channels/.... Loading checks whichever is present against the model config before reading any weights, so
pointing the 1.3B experiment at a 14B folder fails at once with the fields that differ and the config to pick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fpsa_train.models.config import WAN_1_3B, WAN_14B, WanConfig

CONFIG_NAME = "config.json"
# diffusers config.json field → WanConfig field (dim is num_attention_heads · attention_head_dim)
_DIFFUSERS_FIELDS = {"num_attention_heads": "num_heads", "in_channels": "in_dim", "out_channels": "out_dim",
                     **{k: k for k in ("text_dim", "freq_dim", "ffn_dim", "num_layers", "eps", "patch_size")}}
PUBLISHED = {"wan1_3b": WAN_1_3B, "wan14b": WAN_14B}  # configs/model/ option → the sizes that identify it


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into (or saved from) the model as it is."""


class CheckpointConfigError(CheckpointError):
    """A config.json that is unreadable or describes another architecture than the model's."""


def _config_file(path: Path) -> Path | None:
    """The config.json that describes the weights at `path` (beside a file, in a folder or its transformer/)."""
    if path.is_file():
        return path if path.name == CONFIG_NAME else _config_file(path.parent)
    for folder in (path, path / "transformer"):
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


def config_from_checkpoint(path: str | Path) -> dict:
    """WanConfig fields from an original (`dim`, `num_heads`, ...) or diffusers (`num_attention_heads`,
    `attention_head_dim`, ...) config.json; `path` is the file, its folder, a pipeline folder or a weights file.
    Fields the file does not carry are absent (the original omits text_dim and patch_size)."""
    file = _config_file(Path(path))
    if file is None:
        raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointConfigError(f"{file} is not valid JSON: {e}") from e
    if raw.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in raw:
        fields = {ours: raw[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if raw.get(theirs) is not None}
        if raw.get("attention_head_dim") is not None and "num_heads" in fields:
            fields["dim"] = fields["num_heads"] * raw["attention_head_dim"]
    elif "dim" in raw and "num_heads" in raw:
        fields = {k: raw[k] for k in WanConfig().architecture() if raw.get(k) is not None}
    else:
        raise CheckpointConfigError(f"{file} is neither an original Wan config.json (dim, num_heads, ...) nor a "
                                    f"diffusers WanTransformer3DModel one (num_attention_heads, ...)")
    if "patch_size" in fields:
        fields["patch_size"] = [int(p) for p in fields["patch_size"]]
    return fields


def check_config(cfg: WanConfig, path: str | Path) -> None:
    """Raise CheckpointConfigError listing every architecture field where the checkpoint's config.json and
    `cfg` differ, with the published model config that matches the checkpoint if there is one."""
    theirs, ours = config_from_checkpoint(path), cfg.architecture()
    differ = [k for k, v in ours.items() if k in theirs and not (
        math.isclose(theirs[k], v) if isinstance(v, float) else theirs[k] == v)]
    if not differ:
        return
    matches = [name for name, sizes in PUBLISHED.items() if all(theirs.get(k) == v for k, v in sizes.items())]
    hint = f"pick the matching model config (model={matches[0]})" if matches else \
        "build the model config from the checkpoint's config.json"
    raise CheckpointConfigError(
        f"checkpoint {path} is {', '.join(f'{k}={theirs[k]}' for k in differ)} but the model config has "
        f"{', '.join(f'{k}={ours[k]}' for k in differ)}: {hint}")



def config_json(cfg: WanConfig, key_format: str) -> dict:
    """The config.json an export in `key_format` carries (original or diffusers fields)."""
    arch = cfg.architecture()
    if key_format == "original":
        return {"_class_name": "WanModel", "model_type": "t2v", **dict(sorted(arch.items()))}
    return {"_class_name": "WanTransformer3DModel", "attention_head_dim": cfg.head_dim,
            **{theirs: arch[ours] for theirs, ours in _DIFFUSERS_FIELDS.items()},
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_len, "pos_embed_seq_len": None}
