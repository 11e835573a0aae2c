"""Consolidate a DeepSpeed ZeRO-2/3 checkpoint folder into one fp32 state dict, without unpickling anything.

DeepSpeed's own consolidation (`zero_to_fp32`) reads its files with full unpickling, which the project never does.
This reader uses `torch.load(weights_only=True)`; the three DeepSpeed bookkeeping classes its optimizer files
pickle (the loss scaler, fragment addresses, the ZeRO stage enum) are mapped to an inert stand-in, so no DeepSpeed
code is imported or run and DeepSpeed need not be installed. The result equals `zero_to_fp32`'s (tested against
its output on checkpoints that DeepSpeed wrote: tests/fixtures/zero, scripts/make_zero_fixtures.py).

Layout, as Lightning's DeepSpeed strategy writes it (`trainer.save_checkpoint("last.ckpt")` makes a folder):

    last.ckpt/latest                                         the tag: the sub-folder's name ("checkpoint")
    last.ckpt/<tag>/mp_rank_00_model_states.pt               ZeRO-2: parameter copies, shapes, buffers, client state
    last.ckpt/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt  ZeRO-3: one per rank (parameters are empty there)
    last.ckpt/<tag>/zero_pp_rank_R_mp_rank_00_optim_states.pt  per rank: its partition of the fp32 master weights
                                                              (`bf16_zero_pp_rank_...` when training in bf16)

The fp32 master weights are the ones to export (the module copies are in the training dtype, or empty):
- ZeRO-2: per parameter group, the ranks' partitions (`single_partition_of_fp32_groups[g]`) joined in rank order
  are the group's trainable parameters flattened in `param_shapes[g]` order; the alignment padding at the end
  (under 2·world elements) was dropped when saving.
- ZeRO-3: each parameter is split on its own into ceil(numel / world) elements per rank, and each rank lays its
  pieces one after another in `param_shapes` order (`fp32_flat_groups`); a parameter is its ranks' pieces joined
  and cut to numel (the padding is not zeroed, so it must be cut, not trusted).
Frozen parameters come from `frozen_param_fragments` (whole under ZeRO-2, per-rank pieces split the same way under
ZeRO-3), buffers from the module copy of rank 0. Under ZeRO-3 our EMA is partitioned the same way (lit/ema.py):
each rank's model-states file holds its slices, and the client state returned here carries them joined.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from fpsa_train.lit.ema import consolidate_partitions
from fpsa_train.lit.training_checkpoint import EMA_KEY, EMA_PARTITIONED_KEY, MODULE_PREFIXES
from fpsa_train.models.checkpoint_config import CheckpointError

_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                      "deepspeed.utils.tensor_fragment.fragment_address",
                      "deepspeed.runtime.zero.config.ZeroStageEnum")


class _Inert:
    """Stands in for DeepSpeed's bookkeeping objects while unpickling: keeps the arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _load(file: Path) -> dict:
    with torch.serialization.safe_globals([(_Inert, name) for name in _DEEPSPEED_GLOBALS]):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  an unknown pickled class, or a truncated file: name the file
            raise CheckpointError(f"{file}: cannot read it with torch.load(weights_only=True) ({type(e).__name__}: "
                                  f"{e}); if a newer DeepSpeed pickles other classes, consolidate the checkpoint with "
                                  "DeepSpeed's zero_to_fp32 on a trusted machine and export that file") from e


def _rank_files(folder: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_{kind}_states\.pt$")  # bf16_: DeepSpeed's bf16
    ranked = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name)))
    if [r for r, _ in ranked] != list(range(len(ranked))):
        raise CheckpointError(f"{folder}: {kind}-state files of ranks {[r for r, _ in ranked]}; expected 0..N-1")
    return [p for _, p in ranked]


def tag_folder(path: Path) -> Path:
    """The folder holding the state files: `path/<contents of path/latest>`, or `path` itself."""
    if any(p.name.endswith("_model_states.pt") for p in path.iterdir()):
        return path
    latest = path / "latest"
    if not latest.is_file():
        raise CheckpointError(f"{path} is not a DeepSpeed checkpoint folder: no `latest` file and no *_model_states.pt")
    tag = path / latest.read_text().strip()
    if not tag.is_dir():
        raise CheckpointError(f"{latest} names {tag.name!r}, which is not a folder in {path}")
    return tag


def _pieces(flat: torch.Tensor, offset: int, size: int, where: str) -> torch.Tensor:
    if offset + size > flat.numel():
        raise CheckpointError(f"{where}: the fp32 partition ends at {flat.numel()} but a parameter needs elements "
                              f"up to {offset + size}; the checkpoint is truncated or not a ZeRO layout this reader "
                              "knows")
    return flat[offset:offset + size]


def _zero2(shapes: list[dict], optim: list[dict], where: str) -> dict[str, torch.Tensor]:
    world, out = len(optim), {}
    for g, group in enumerate(shapes):
        full = torch.cat([o["optimizer_state_dict"]["single_partition_of_fp32_groups"][g] for o in optim])
        offset = 0
        for name, shape in group.items():
            n = math.prod(shape)
            out[name] = _pieces(full, offset, n, where).view(shape).clone()
            offset += n
        if not 0 <= full.numel() - offset < 2 * world:
            raise CheckpointError(f"{where}: parameter group {g} holds {full.numel()} fp32 values but its parameters "
                                  f"need {offset}; not a ZeRO-2 layout this reader knows")
    return out


def _zero3(shapes: list[dict], optim: list[dict], where: str) -> dict[str, torch.Tensor]:
    world = len(optim)
    flats = [torch.cat(list(o["optimizer_state_dict"]["fp32_flat_groups"])) for o in optim]  # one per rank
    out, offset = {}, 0
    for group in shapes:
        for name, shape in group.items():
            n = math.prod(shape)
            part = math.ceil(n / world)
            out[name] = torch.cat([_pieces(f, offset, part, where) for f in flats])[:n].view(shape).clone()
            offset += part
    if any(f.numel() != offset for f in flats):
        raise CheckpointError(f"{where}: the ranks hold {[f.numel() for f in flats]} fp32 values but the parameters "
                              f"need {offset} each; not a ZeRO-3 layout this reader knows")
    return out


def _frozen(states: list[dict], stage: int) -> dict[str, torch.Tensor]:
    shapes = states[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if stage <= 2:
            out[name] = states[0]["frozen_param_fragments"][name].reshape(shape).clone()
        else:
            out[name] = torch.cat([s["frozen_param_fragments"][name].flatten() for s in states])[:n].view(shape).clone()
    return out


def read_zero_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full fp32 state dict in the module's key names, rank 0's client state) of a ZeRO-1/2/3 checkpoint folder."""
    folder = tag_folder(Path(path))
    optim_files = _rank_files(folder, "optim")
    if not optim_files:
        raise CheckpointError(f"{folder}: no [bf16_]zero_pp_rank_*_optim_states.pt files; not a ZeRO checkpoint")
    single = folder / "mp_rank_00_model_states.pt"
    model_files = [single] if single.is_file() else _rank_files(folder, "model")
    if not model_files:
        raise CheckpointError(f"{folder}: no model-states file (mp_rank_00_model_states.pt or zero_pp_rank_0_...)")
    states = [_load(f) for f in model_files]
    client = states[0]
    stage = int((client.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 3 if len(states) > 1 else 2))
    optim = [_load(f) for f in optim_files]
    shapes = client["param_shapes"]
    shapes = shapes if isinstance(shapes, list) else [shapes]
    where = str(folder)
    weights = _zero3(shapes, optim, where) if stage == 3 else _zero2(shapes, optim, where)
    weights.update(_frozen(states, stage))
    module = client.get("module") or {}
    for name in client.get("buffer_names") or []:
        weights[name] = module[name].clone()
    shared = client.get("shared_params") or {}
    for alias, source in (shared.items() if isinstance(shared, dict) else shared):
        if source in weights:
            weights[alias] = weights[source]
    if client.get(EMA_PARTITIONED_KEY) and client.get(EMA_KEY):
        client = {**client, EMA_KEY: _join_ema(states, shapes, where), EMA_PARTITIONED_KEY: False}
    return weights, client


def _join_ema(states: list[dict], shapes: list[dict], where: str) -> dict[str, torch.Tensor]:
    """The full EMA from the ranks' ZeRO-3 slices (EMA keys are the model's names, without Lightning's prefix)."""
    flat = {name: tuple(shape) for group in shapes for name, shape in group.items()}
    full_shapes = {}
    for key in states[0][EMA_KEY]:
        match = next((flat[p + key] for p in (*MODULE_PREFIXES, "") if p + key in flat), None)
        if match is None:
            raise CheckpointError(f"{where}: EMA entry {key!r} matches no parameter of the checkpoint")
        full_shapes[key] = match
    try:
        return consolidate_partitions([s[EMA_KEY] for s in states], full_shapes)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{where}: the ranks' EMA slices do not join up ({e})") from e
