"""The deploy folder: what `python -m fpsa_train.export` writes, and the runtime that loads it.

Layout (flat, so that a diffusers-format export is also a `WanTransformer3DModel.from_pretrained` folder):

    diffusion_pytorch_model.safetensors   the weights, bf16 by default; above the shard size
                                          `-0000N-of-0000M.safetensors` shards plus `.safetensors.index.json`;
                                          original Wan key names or diffusers' (`key_format`)
    config.json                           the weights' config, in the fields of the same key format
    fps_selectors.safetensors             learned tile selectors (fp32); only when the schedule has a learned regime
    schedule.json                         the step-aware schedule: regimes over σ (quantization group, sparsity)
    manifest.json                         format version, sha256 and size of every other file, the whole model
                                          config (token order, tile shape), the kernel features the schedule
                                          needs, sampling defaults, where the weights came from, and the sha256 of
                                          its own content (`manifest_sha256`)

Why hashes: deploy folders travel (object stores, rsync, partial copies), and a truncated shard or a hand-edited
schedule would otherwise load and quietly produce wrong video. `load_deploy` recomputes every hash before it
builds anything, and refuses the folder naming each missing, changed or unlisted file. The manifest itself is
read by the runtime (model config, key format, kernel features) and the sampler (sampling defaults), so it is
covered too: `manifest_sha256` is the sha256 of the manifest's canonical JSON without that field (sorted keys,
no whitespace, so re-indenting the file changes nothing), and any edit of any field is refused. These are
checksums against accidents and hand edits, not signatures: whoever rewrites a file and its hash is trusted.
Folders of format_version 1 have no such hash and are refused with the re-export command (see `read_manifest`).

The runtime builds our Wan DiT from the manifest, loads the weights (fp32 on CPU, bf16 under autocast on CUDA)
and swaps in FPS attention with the exported schedule. Which implementation runs is decided as in training
(`fps.backend`): the Hopper FP8 kernel on H100/H200, the PyTorch reference elsewhere; `Deployed.backend` says
which, and loading logs it.

Evaluation needs two variations of the same weights, so the runtime offers them rather than evaluate forking it:
`load_deploy(..., fps=False)` keeps dense SDPA (the model's own BF16 baseline: same weights, no FP8, no sparsity),
and `Deployed.only_regime(name)` runs every step in one regime of the schedule whatever σ, so the damage of each
regime can be measured alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fpsa_train.fps.fp8 import GROUPS
from fpsa_train.fps.schedule import BACKENDS, PATTERNS, Schedule, schedule_from_data
from fpsa_train.models.config import WanConfig
from fpsa_train.models.wan import WanModel
from fpsa_train.sampling import mean_realised_density, velocity

log = logging.getLogger(__name__)

FORMAT = "fpsa-deploy"
FORMAT_VERSION = 2
"""2: the manifest records `manifest_sha256`. Version 1 (no hash over the model config) is refused."""
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"
SCHEDULE = "schedule.json"
SELECTORS = "fps_selectors.safetensors"
SELECTOR_PREFIX = "self_attn.core."  # learned selectors live in `blocks.N.self_attn.core.selectors.<regime>.*`


class DeployError(ValueError):
    """A deploy folder that cannot be used as it is; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------------ manifest


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path) -> dict[str, dict]:
    """{name: {sha256, bytes}} of every file in `folder` except the manifest (sorted by name)."""
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def kernel_features(cfg: WanConfig, schedule: Schedule | None) -> dict:
    """What a kernel must implement to run this export (the runtime refuses features it does not know)."""
    regimes = schedule.regimes if schedule is not None else ()
    groups = sorted({r.quant.group for r in regimes if r.quant is not None})
    return {"fp8_e4m3": bool(groups), "quant_groups": groups, "sparsity_patterns": sorted({r.pattern for r in regimes}),
            "head_dim": cfg.head_dim, "token_order": cfg.token_order, "tile_shape": list(cfg.tile_shape),
            "min_compute_capability": [9, 0] if groups else None}


def check_kernel_features(features: dict, where: Path) -> None:
    unknown = [f"quant group {g!r}" for g in features.get("quant_groups", []) if g not in GROUPS]
    unknown += [f"sparsity pattern {p!r}" for p in features.get("sparsity_patterns", []) if p not in PATTERNS]
    if unknown:
        raise DeployError(f"{where / MANIFEST}: the export needs {', '.join(unknown)}, which this fpsa version does "
                          "not implement; load it with the fpsa version that exported it (or a newer one)")


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace, UTF-8) without `manifest_sha256`:
    what the manifest says, independent of how the file is indented or ordered."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def reexport_command(folder: Path, manifest: dict) -> str:
    """The export command that rewrites `folder` from the checkpoint its manifest names (the fix for a folder
    that cannot be verified)."""
    source = manifest.get("source") or {}
    args = [f"checkpoint={source.get('checkpoint', '<training checkpoint>')}", f"out={folder}", "overwrite=true"]
    for key, default in (("key_format", "original"), ("dtype", "bfloat16")):
        if manifest.get(key, default) != default:
            args.append(f"{key}={manifest[key]}")
    weights = {"model": "live"}.get(source.get("weights"), source.get("weights"))  # older exports: `model`
    if weights in ("ema", "live"):
        args.append(f"weights={weights}")
    if source.get("schedule") not in (None, "checkpoint"):
        args.append(f"schedule_file={source['schedule']}")
    return "python -m fpsa_train.export " + " ".join(args)


def check_manifest_sha256(manifest: dict, file: Path) -> None:
    """Refuse a manifest whose content differs from what export wrote (its model config, key format, kernel
    features and sampling defaults decide what the runtime computes, so an edit would change the output)."""
    recorded = manifest.get(MANIFEST_SHA256)
    if recorded is None:
        raise DeployError(f"{file}: no {MANIFEST_SHA256}; format_version {FORMAT_VERSION} manifests record the "
                          f"sha256 of their own content. Re-export: {reexport_command(file.parent, manifest)}")
    if recorded != manifest_sha256(manifest):
        raise DeployError(f"{file} has been edited since export: its content no longer matches its "
                          f"{MANIFEST_SHA256} (the model config, key format, kernel features and sampling defaults in "
                          "it are what the runtime computes with). Restore the exported manifest.json, or re-export: "
                          f"{reexport_command(file.parent, manifest)}")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of `folder`, checked: format, version, and the sha256 of its own content (cheap, so it is
    checked even when `verify_deploy`'s file hashes are skipped).

    Version 1 folders are refused rather than loaded with a warning: their model config (RoPE θ, tile shape, ...)
    is covered by no hash, so an edit cannot be told from the export, and a warning would not stop the wrong
    video it makes. The manifest names its checkpoint, so re-exporting is one command (given in the error)."""
    folder = Path(folder)
    file = folder / MANIFEST
    if not file.is_file():
        raise DeployError(f"{folder} is not a deploy folder: no {MANIFEST} (write one with "
                          "python -m fpsa_train.export)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DeployError(f"{file} is not valid JSON ({e}); re-export the checkpoint") from e
    if manifest.get("format") != FORMAT:
        raise DeployError(f"{file}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DeployError(f"{file}: format_version {version!r} is newer than this fpsa reads ({FORMAT_VERSION}); "
                          "upgrade fpsa")
    if version < FORMAT_VERSION:
        raise DeployError(f"{file}: format_version {version} (an older fpsa's export, whose model config no hash "
                          f"covers); this fpsa reads format_version {FORMAT_VERSION}. Re-export: "
                          f"{reexport_command(folder, manifest)}")
    check_manifest_sha256(manifest, file)
    return manifest


def verify_deploy(folder: str | Path) -> dict:
    """The manifest, after checking every listed file's size and sha256 and that no file is unlisted.

    Raises DeployError listing every missing, changed or unlisted file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest.get("files") or {}
    problems = []
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} has changed (sha256 differs from the manifest)")
    unlisted = [p.name for p in sorted(folder.iterdir()) if p.name not in listed and p.name != MANIFEST]
    problems += [f"{name} is not in the manifest" for name in unlisted]
    if problems:
        raise DeployError(f"deploy folder {folder} failed verification: {'; '.join(problems)}. Re-export it, or copy "
                          "the whole folder again")
    check_kernel_features(manifest.get("kernel", {}), folder)
    return manifest


def model_config(manifest: dict) -> WanConfig:
    known = {f.name for f in fields(WanConfig)}
    return WanConfig(**{k: v for k, v in manifest["model"].items() if k in known})


def load_schedule(folder: str | Path, cfg: WanConfig) -> Schedule | None:
    """The exported schedule, validated as training validates it; None for an export without FPS attention."""
    return schedule_from_data(json.loads((Path(folder) / SCHEDULE).read_text()), tuple(cfg.tile_shape))


# ------------------------------------------------------------------------------------------------- runtime


@dataclass
class Deployed:
    """A loaded deploy folder: the model with FPS attention, its schedule, and what runs it."""

    model: WanModel
    schedule: Schedule | None
    manifest: dict
    folder: Path
    device: torch.device
    backend: str
    """Which attention implementation runs, in words (also logged at load; within `only_regime`, for that regime)."""
    compiled: bool = False
    """Whether the DiT runs under torch.compile (`compile`)."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.manifest.get("sampling", {}).get("num_train_timesteps", 1000))

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, context,
                timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The velocity (fp32) for latents x (B, C, F, H, W) at noise level σ (scalar or (B,)), the regime of each
        sample the one of the current schedule that owns its σ (`sampling.velocity`, which says how)."""
        return velocity(self.model, self.schedule, x, sigma, context, timestep, self.num_train_timesteps,
                        self.compiled)

    def realised_density(self) -> float:
        """Fraction of (query tile, key tile) pairs the last forward's self-attention computed, mean over layers
        (and over the regimes of the batch); 1.0 when attention is dense SDPA."""
        return mean_realised_density(self.model, self.schedule)

    @contextmanager
    def only_regime(self, name: str):
        """Within the block, every step runs in the schedule's regime `name`, whatever its σ (it is given σ ∈ [0, 1]
        and keeps its name, so learned regimes keep their selectors); the exported schedule is back on exit.
        For evaluation: each regime's damage seen alone."""
        from fpsa_train.fps.schedule import Schedule
        from fpsa_train.fps.transform import fps_cores

        if self.schedule is None:
            raise DeployError(f"{self.folder}: regime {name!r} asked for, but attention is dense SDPA here (no FPS "
                              "schedule, or loaded with fps=False)")
        names = [r.name for r in self.schedule.regimes]
        if name not in names:
            raise DeployError(f"regime {name!r} is not in {self.folder / SCHEDULE}: its regimes are {names}")
        exported, described, cores = self.schedule, self.backend, fps_cores(self.model)
        forced = Schedule((dataclasses.replace(exported.regimes[names.index(name)], lo=0.0, hi=1.0),))
        for core in cores:
            core.schedule = forced
        self.schedule = forced
        self.backend = describe_backend(forced, self.device, cores[0].backend, self.model.cfg.head_dim,
                                        cores[0].kernel_forward)
        try:
            yield self
        finally:
            for core in cores:
                core.schedule = exported
            self.schedule, self.backend = exported, described

    def compile(self, backend="inductor", mode: str | None = None) -> Deployed:
        """torch.compile every DiT block, in place (the model stays the same object, its state dict keys too);
        returns self. A block's linears, norms, RoPE, modulation, cross-attention and elementwise work compile around
        the FPS attention op (fps/op.py); the patch embedding, time embedding and head (a few ops per step) stay
        eager. Per block, not the whole forward: the blocks share their code, so one compiled graph serves all of
        them and compile time does not grow with depth (40 blocks at 14B), and the model's per-grid cache of RoPE
        and permutations stays outside the compiled region, where Dynamo cannot write it. Each regime and latent
        size compiles on its first step; shapes are static (`dynamic=False`: a video's steps share one). Dynamo
        keeps `torch._dynamo.config.recompile_limit` (8) graphs per block; past them it warns and runs eagerly.
        `fullgraph` when every regime's block is one graph; otherwise (`transform.graph_breaks`: learned regimes, or
        regimes the PyTorch reference runs) those steps break the graph in every block, which is logged.
        `backend` and `mode` are torch.compile's (mode "reduce-overhead": CUDA graphs are split around the op)."""
        from fpsa_train.fps.transform import fps_cores, graph_breaks

        cores = fps_cores(self.model)
        breaks = {} if self.schedule is None else graph_breaks(
            self.schedule, self.device, self.model.cfg.head_dim, cores[0].backend, cores[0].materialize)
        if breaks:
            log.warning("torch.compile of %s: these regimes break the graph in every block: %s", self.folder,
                        "; ".join(f"{name}: {why}" for name, why in breaks.items()))
        for block in self.model.blocks:
            block.compile(backend=backend, mode=mode, fullgraph=not breaks, dynamic=False)
        self.compiled = True
        return self


def describe_backend(schedule: Schedule | None, device: torch.device, backend: str, head_dim: int,
                     kernel_forward: str = "triton") -> str:
    """Which implementation FPS attention uses on `device`, per regime, in words: the decision FPSAttention makes
    on every call (`reference_reason`), made once here, and which forward the kernel runs (`kernel_forward`).
    Raises for backend=kernel where the kernel cannot run."""
    from fpsa_train.fps.transform import reference_reason

    if schedule is None:
        return "dense SDPA (the export has no FPS schedule)"
    reasons = {r.name: reference_reason(device, head_dim, r, backend) for r in schedule.regimes}
    kernel = [name for name, why in reasons.items() if why is None]
    parts = []
    if kernel:
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
        forward = "" if kernel_forward == "triton" else f", {kernel_forward} forward"
        parts.append(f"Hopper FP8 tile-sparse kernel (fpsa_kernels{forward}) on {where} for {', '.join(kernel)}")
    for why in dict.fromkeys(w for w in reasons.values() if w is not None):
        names = [name for name, w in reasons.items() if w == why]
        parts.append(f"PyTorch reference for {', '.join(names)} ({why})")
    return "; ".join(parts)


def load_deploy(folder: str | Path, device: str | torch.device = "cpu", backend: str = "auto",
                dtype: torch.dtype | None = None, verify: bool = True, fps: bool = True,
                fp8_linears: bool = False, compile: bool = False, kernel_forward: str = "triton") -> Deployed:
    """Load a deploy folder: verify it, build the DiT from its manifest, load the weights, apply FPS attention.

    `dtype` of the parameters: default fp32 on CPU (exactly the exported values, computed in fp32) and bf16 on CUDA
    (the stored dtype; `Deployed.denoise` runs under bf16 autocast there). `verify=False` skips the files' hashes
    (the manifest's own hash is still checked); only for folders checked moments ago. `fps=False` leaves the
    schedule unapplied: dense SDPA with the same weights (evaluation's dense reference). `fp8_linears=True` runs the
    blocks' large Linears in FP8 (torchao, per-row scales; fpsa_train/fp8_linears.py): off by default until its
    quality is shown; needs torchao and a CUDA GPU of compute capability >= 8.9, checked before the weights are read.
    `compile=True` compiles the DiT with torch.compile (`Deployed.compile`): opt-in, its first step per regime
    compiles. `kernel_forward="gluon"` runs the FP8 kernel's warp-specialised Gluon forward instead of the Triton one
    (fps/transform.py; Hopper and head dim 128 only, where it raises otherwise): opt-in, checked before the weights
    are read.
    """
    from fpsa_train.fps.transform import check_kernel_forward
    from fpsa_train.models.checkpoint import load_wan_weights

    folder, device = Path(folder), torch.device(device)
    if backend not in BACKENDS:
        raise DeployError(f"backend={backend!r}: expected one of {BACKENDS}")
    check_kernel_forward(kernel_forward)
    if fp8_linears:
        from fpsa_train.fp8_linears import check_fp8_available

        check_fp8_available(device)
    manifest = verify_deploy(folder) if verify else read_manifest(folder)
    cfg = model_config(manifest)
    schedule = load_schedule(folder, cfg) if fps else None
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = WanModel(cfg)
    load_wan_weights(model, folder, key_format=manifest["key_format"], dtype=dtype)
    model = model.to(device).eval()
    described = None if fps else "dense SDPA (fps=False: the exported schedule is not applied)"
    deployed = assemble(model, schedule, manifest, folder, device, backend=backend, fp8_linears=fp8_linears,
                        compile=compile, selectors=True, described=described, kernel_forward=kernel_forward)
    log.info("deploy %s: %s weights (%s), attention: %s", folder, manifest["key_format"], dtype, deployed.backend)
    return deployed


def assemble(model: WanModel, schedule: Schedule | None, manifest: dict, folder: Path, device: torch.device, *,
             backend: str = "auto", fp8_linears: bool = False, compile: bool = False, selectors: bool = False,
             described: str | None = None, kernel_forward: str = "triton") -> Deployed:
    """The runtime around a DiT whose weights are in place, in the order `load_deploy` uses: FPS attention with
    `schedule` (None: dense SDPA) and, with `selectors`, the learned selectors from `folder`, then FP8 linears, then
    torch.compile. `described` replaces `describe_backend`'s words; `kernel_forward` is the kernel's inference forward
    (`load_deploy`). Also for a model built in memory
    (scripts/bench_deploy.py --no-export), so what is timed there is what load_deploy returns."""
    from fpsa_train.fps.transform import apply_fps_attention

    if schedule is not None:
        apply_fps_attention(model, schedule, backend=backend, kernel_forward=kernel_forward)
        if selectors:
            _load_selectors(model, folder, device)
    if fp8_linears:
        from fpsa_train.fp8_linears import apply_fp8_linears

        apply_fp8_linears(model)
    if described is None:
        described = describe_backend(schedule, device, backend, model.cfg.head_dim, kernel_forward)
    deployed = Deployed(model, schedule, manifest, folder, device, described)
    return deployed.compile() if compile else deployed


def _load_selectors(model: WanModel, folder: Path, device: torch.device) -> None:
    """Learned selectors from fps_selectors.safetensors into the FPS cores, strictly (keys listed if they differ)."""
    expected = {k for k in model.state_dict() if SELECTOR_PREFIX in k}
    file = folder / SELECTORS
    stored = {}
    if file.is_file():  # verify_deploy has checked its hash, unless verify=False: then name a damaged file
        from fpsa_train.models.checkpoint import open_safetensors

        with open_safetensors(file, "Re-export the folder, or copy it again", error=DeployError,
                              device=str(device)) as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    missing, unexpected = sorted(expected - stored.keys()), sorted(stored.keys() - expected)
    if missing or unexpected:
        raise DeployError(f"{file}: learned selectors do not fit the schedule: missing {missing[:20]}, "
                          f"unexpected {unexpected[:20]}")
    if stored:
        model.load_state_dict(stored, strict=False)
