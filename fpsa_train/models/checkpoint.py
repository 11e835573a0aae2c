"""Loading and saving Wan DiT weights in the layouts the published checkpoints use.

Loading reads the header first (keys, shapes; no tensor data) so that a wrong config, a missing key or a wrong
shape fails in a second with a message naming it, before gigabytes are read. Tensors are then read and cast one
at a time, and a model built on the meta device receives them by assignment, so a 14B load never holds two full
copies of the weights. Only safetensors and `torch.load(weights_only=True)` are used: nothing is unpickled.

Saving writes into a temporary sibling folder and renames it into place (fpsa_train/atomic.py `replacing_dir`), so
a crash midway never leaves a half-written checkpoint under the final name, nor destroys the previous one. A killed
write leaves its hidden sibling behind; the next replace of the same folder removes the leftovers whose writer
process is gone.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fpsa_train.atomic import replacing_dir
from fpsa_train.models.checkpoint_config import (CONFIG_NAME, CheckpointConfigError, CheckpointError, _config_file,
                                                 check_config, config_from_checkpoint, config_json)
from fpsa_train.models.config import WanConfig
from fpsa_train.models.state_dict import KEY_FORMATS, convert_state_dict, detect_key_format, to_diffusers
from fpsa_train.models.wan import WanModel

__all__ = ["load_wan_weights", "save_wan_weights", "write_wan_weights", "config_from_checkpoint", "CheckpointError",
           "CheckpointKeyError", "CheckpointShapeError", "CheckpointConfigError"]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
ACCEPTED = (f"a .safetensors or {'/'.join(TORCH_SUFFIXES)} file, a folder with {WEIGHTS_NAME} (or shards plus "
            f"{INDEX_NAME}), or a diffusers pipeline folder with transformer/")
_MAX_LISTED = 20


class CheckpointKeyError(CheckpointError):
    """Missing or unexpected keys."""


class CheckpointShapeError(CheckpointError):
    """A key whose stored shape differs from the model's."""


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


# ------------------------------------------------------------------------------------------------- reading


def _weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The weight files at `path`, and the index's weight_map when the checkpoint is sharded."""
    if path.is_file():
        if path.suffix == ".safetensors" or path.suffix in TORCH_SUFFIXES:
            return [path], None
        raise CheckpointError(f"{path}: unsupported weights file {path.suffix!r}; expected {ACCEPTED}")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist; expected {ACCEPTED}")
    single, index = path / WEIGHTS_NAME, path / INDEX_NAME
    if not single.exists() and not index.exists() and (path / "transformer").is_dir():
        return _weight_files(path / "transformer")
    if single.is_file() and index.is_file():
        raise CheckpointError(f"{path} holds both {WEIGHTS_NAME} and {INDEX_NAME}; remove the stale one")
    if single.is_file():
        return [single], None
    if not index.is_file():
        raise CheckpointError(f"no weights in folder {path}; expected {ACCEPTED}")
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map' {{key: shard file}} object")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard files missing from {path}: {', '.join(missing)}")
    return [path / s for s in shards], weight_map


def open_safetensors(file: Path, fix: str, error: type[ValueError] = CheckpointError, device: str = "cpu"):
    """`safe_open(file)` (a context manager), with a damaged file raised as `error` naming the file and `fix`.

    Why: safetensors checks the header and that the file is as long as the header says, but its messages
    ("incomplete metadata, file not fully covered", "invalid header length") name no file, and a truncated copy
    is the common case (an interrupted rsync, a full disk, a killed write)."""
    try:
        return safe_open(file, framework="pt", device=device)
    except SafetensorError as e:
        raise error(f"{file}: not a complete safetensors file ({e}): it is truncated or damaged, e.g. by an "
                    f"interrupted copy or write. {fix}") from None


_WEIGHTS_FIX = "Copy or download it again (or re-save it from its source)."


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict (or one under 'state_dict'/'module') from a .pt/.pth/.bin, weights only."""
    try:  # mmap keeps the file on disk until each tensor is cast; only the zip format supports it
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: torch.load(weights_only=True) refused it (only tensors and plain "
                              f"containers are read; arbitrary pickles are never loaded): {e}") from e
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError) as e:  # a truncated or damaged file (torch's zip or legacy reader)
        raise CheckpointError(f"{file}: not a complete torch file ({str(e).splitlines()[0]}): it is truncated or "
                              f"damaged. {_WEIGHTS_FIX}") from None
    for nested in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(nested), dict):
            obj = obj[nested]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a {{name: tensor}} dict (optionally under 'state_dict' or "
                              f"'module'), got {type(obj).__name__}")
    return obj


class _Reader:
    """Header first (keys and shapes, no data), then tensors one at a time, file by file."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.torch_sd = _torch_load(files[0]) if files[0].suffix in TORCH_SUFFIXES else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.torch_sd is not None:
            return {k: tuple(v.shape) for k, v in self.torch_sd.items()}
        out = {}
        for file in self.files:
            with open_safetensors(file, _WEIGHTS_FIX) as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return out

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.torch_sd is not None:
            yield from self.torch_sd.items()
            return
        for file in self.files:
            with open_safetensors(file, _WEIGHTS_FIX) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)


def _check_keys(expected: Mapping, names: Mapping[str, str], where: Path, fmt: str) -> None:
    """`names` maps our key → stored key; list missing keys in the checkpoint's naming."""
    missing = [k for k in expected if k not in names]
    unexpected = [names[k] for k in names if k not in expected]
    if not (missing or unexpected):
        return
    if fmt == "diffusers":
        missing = list(to_diffusers(dict.fromkeys(missing)))
    parts = [f"{len(missing)} missing: {_listed(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected: {_listed(unexpected)}"] if unexpected else []
    raise CheckpointKeyError(f"checkpoint {where} ({fmt} key format) does not fit the model; " + "; ".join(parts))


def _check_shapes(expected: Mapping[str, torch.Tensor], stored: Mapping[str, tuple[str, tuple[int, ...]]],
                  where: Path) -> None:
    """`stored` maps our key → (stored key, stored shape)."""
    bad = [f"{name} is {list(shape)} in the checkpoint but {list(expected[ours].shape)} in the model"
           for ours, (name, shape) in stored.items() if tuple(expected[ours].shape) != shape]
    if bad:
        raise CheckpointShapeError(f"checkpoint {where}: {len(bad)} shape mismatch(es): {_listed(bad)}")


def load_wan_weights(model: WanModel, path: str | Path, key_format: str = "auto",
                     dtype: torch.dtype | None = None) -> dict:
    """Load weights into `model` (built normally or on the meta device), casting each float tensor to the
    model's parameter dtype, or to `dtype` if given (the parameters then take that dtype).

    Returns {"path", "files", "key_format", "dtype", "stored_dtypes"}. Raises CheckpointConfigError,
    CheckpointKeyError or CheckpointShapeError before reading any tensor data when the checkpoint does not fit.
    A truncated or damaged safetensors file is a CheckpointError naming it.
    """
    if key_format not in ("auto", *KEY_FORMATS):
        raise ValueError(f"key_format={key_format!r}: expected 'auto' or one of {KEY_FORMATS}")
    path = Path(path)
    files, weight_map = _weight_files(path)
    where = files[0] if len(files) == 1 else files[0].parent
    config = _config_file(files[0].parent)
    if config is not None:
        check_config(model.cfg, config)

    reader = _Reader(files)
    stored = reader.shapes()  # stored key → shape
    if weight_map is not None and set(weight_map) != set(stored):
        diff = sorted(set(weight_map) ^ set(stored))
        raise CheckpointKeyError(f"{where / INDEX_NAME} and its shards disagree on {len(diff)} keys: {_listed(diff)}")
    fmt = detect_key_format(stored) if key_format == "auto" else key_format
    names = convert_state_dict({k: k for k in stored}, "original", fmt)  # our key → stored key
    expected = model.state_dict()  # shapes, dtypes, devices (meta tensors cost nothing)
    _check_keys(expected, names, where, fmt)
    _check_shapes(expected, {ours: (k, stored[k]) for ours, k in names.items()}, where)

    ours_of = {k: ours for ours, k in names.items()}
    sd, stored_dtypes = {}, set()
    for key, tensor in reader.tensors():
        ref = expected[ours_of[key]]
        stored_dtypes.add(str(tensor.dtype).removeprefix("torch."))
        target = (dtype or ref.dtype) if tensor.is_floating_point() else tensor.dtype
        sd[ours_of[key]] = tensor.to(device="cpu" if ref.is_meta else ref.device, dtype=target)
        del tensor  # only the cast copy is kept
    # Assignment replaces meta (or re-typed) parameters by the loaded tensors; otherwise copy in place so the
    # parameter objects (and anything holding them) stay the same.
    assign = dtype is not None or any(t.is_meta for t in expected.values())
    model.load_state_dict(sd, strict=True, assign=assign)
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"after loading {where}, still on the meta device: {_listed(left)}")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return {"path": str(path), "files": [str(f) for f in files], "key_format": fmt,
            "dtype": ",".join(dtypes), "stored_dtypes": sorted(stored_dtypes)}


# -------------------------------------------------------------------------------------------------- saving


def _saveable(key: str, t: torch.Tensor, dtype: torch.dtype | None, seen: set[int]) -> torch.Tensor:
    """A contiguous CPU tensor owning its storage (safetensors refuses tensors that share memory)."""
    if t.is_meta:
        raise CheckpointError(f"{key} is on the meta device: load or initialise the weights before saving")
    t = t.detach().to(device="cpu", dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
    storage = t.untyped_storage()
    if storage.data_ptr() in seen or not t.is_contiguous() or storage.nbytes() != t.nbytes:
        t = t.contiguous().clone()
    seen.add(t.untyped_storage().data_ptr())
    return t


def _shards(sd: Mapping[str, torch.Tensor], nbytes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped in order into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for key in sd:
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(key)
        size += nbytes[key]
    return shards


def save_wan_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], out_dir: str | Path,
                     key_format: str = "original", cfg: WanConfig | None = None,
                     max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> dict:
    """Write safetensors weights (one file, or shards plus an index above max_shard_bytes) and a config.json
    in `key_format` into the folder `out_dir`, atomically (fpsa_train/atomic.py `replacing_dir`: an existing
    `out_dir` is replaced once the new one is complete). `cfg` defaults to the model's; a state dict (either key
    format) needs it.

    Returns {"out_dir", "files", "total_size"}.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} exists and is not a folder")
    sd, cfg = _to_save(model_or_state_dict, key_format, cfg)  # checked before anything is written
    with replacing_dir(out_dir) as tmp:
        written = _write_weights(sd, cfg, tmp, key_format, max_shard_bytes, dtype)
    return {"out_dir": str(out_dir), **written}


def write_wan_weights(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], folder: str | Path,
                      key_format: str = "original", cfg: WanConfig | None = None,
                      max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> dict:
    """`save_wan_weights` into an existing folder, not atomically: for a caller that fills a temporary folder of
    its own with more files and swaps it in itself (export). Returns {"files", "total_size"}."""
    sd, cfg = _to_save(model_or_state_dict, key_format, cfg)
    return _write_weights(sd, cfg, Path(folder), key_format, max_shard_bytes, dtype)


def _to_save(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], key_format: str,
             cfg: WanConfig | None) -> tuple[dict[str, torch.Tensor], WanConfig]:
    """(the state dict in `key_format`, its WanConfig), its keys and shapes checked against the architecture."""
    if key_format not in KEY_FORMATS:
        raise ValueError(f"key_format={key_format!r}: expected one of {KEY_FORMATS}")
    if isinstance(model_or_state_dict, nn.Module):
        cfg = cfg or model_or_state_dict.cfg
        model_or_state_dict = model_or_state_dict.state_dict()
    if cfg is None:
        raise ValueError("save_wan_weights needs cfg (the WanConfig of the weights) when given a state dict")
    ours = convert_state_dict(model_or_state_dict, "original")
    with torch.device("meta"):
        expected = WanModel(cfg).state_dict()
    _check_keys(expected, {k: k for k in ours}, Path("<state dict to save>"), "original")
    _check_shapes(expected, {k: (k, tuple(v.shape)) for k, v in ours.items()}, Path("<state dict to save>"))
    return (ours if key_format == "original" else to_diffusers(ours)), cfg


def _write_weights(sd: dict[str, torch.Tensor], cfg: WanConfig, folder: Path, key_format: str,
                   max_shard_bytes: int, dtype: torch.dtype | None) -> dict:
    itemsize = {k: (dtype if dtype is not None and t.is_floating_point() else t.dtype).itemsize for k, t in sd.items()}
    nbytes = {k: t.numel() * itemsize[k] for k, t in sd.items()}
    shards = _shards(sd, nbytes, max_shard_bytes)
    names = [WEIGHTS_NAME] if len(shards) == 1 else \
        [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    seen: set[int] = set()
    for name, keys in zip(names, shards):
        save_file({k: _saveable(k, sd[k], dtype, seen) for k in keys}, str(folder / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / CONFIG_NAME).write_text(json.dumps(config_json(cfg, key_format), indent=2) + "\n")
    return {"files": names, "total_size": sum(nbytes.values())}
