"""`evaluate(cfg)`: sample every variant on the same prompts, seeds and initial noise, then measure and report.

A *variant* is one model run one way: the reference; each candidate with its exported schedule; and with
`per_regime=true` each candidate with one regime of its schedule forced on every step (`Deployed.only_regime`),
so the damage each regime does is seen alone, not averaged into the schedule's; with `fp8_linears=true` each
candidate with its schedule and FP8 linears (`<candidate>.fp8`). Every variant samples every
(prompt, seed) through `sample.generate`, the code path of `python -m fpsa_train.sample`, from
`sample.initial_noise(seed)`: noise drawn on the CPU from the seed alone, so a candidate and its reference start
from bit-identical latents and differ only by their weights and attention (each video's record carries the
noise's sha256, which the tests compare).

The work runs in three passes, so that only what is missing costs model time:
1. sampling: videos already saved with the same inputs (`store.VideoStore`) are reused; for the others, the text
   encoder embeds the prompts once and is freed, then each deploy folder is loaded once for all its variants;
2. measuring, from the saved frames: fidelity to the reference (metrics.py), prompt following (following.py),
   the per-step attention density and seconds recorded while sampling, and optionally VBench (vbench.py);
3. reporting (report.py): results.md, results.json, contact_sheet.png, plot.png.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fpsa_train.errors import ConfigError
from fpsa_train.deploy import load_schedule, model_config, read_manifest
from fpsa_train.eval import following, metrics
from fpsa_train.eval.config import DENSE, EvaluateConfig
from fpsa_train.eval.prompts import load_prompts, load_seeds, prompt_id
from fpsa_train.eval.store import VideoStore, safe_name
from fpsa_train.sample import components_folder, negative_prompt, resolve_device, video_size

log = logging.getLogger(__name__)

REFERENCE = "reference"


@dataclass
class Variant:
    """One model sampled one way."""

    key: str
    """Results key and videos/ folder: `reference`, `<candidate>` (its schedule) or `<candidate>@<regime>`."""
    model: str
    """The model, for people: a candidate's folder name, or what the reference is."""
    attention: str
    """`schedule` (as exported), `regime:<name>` (one regime on every step) or `dense` (SDPA); part of the inputs."""
    folder: Path
    manifest: dict
    regimes: list = field(default_factory=list)
    """The exported schedule's regimes (fps.schedule.Regime), for the report."""
    fp8_linears: bool = False
    """The blocks' large Linears in FP8 (`load_deploy(fp8_linears=True)`); part of the inputs when on."""

    @property
    def only(self) -> str | None:
        return self.attention.split(":", 1)[1] if self.attention.startswith("regime:") else None

    @property
    def label(self) -> str:
        if self.fp8_linears:
            return dataclasses.replace(self, fp8_linears=False).label + " + FP8 linears"
        if self.attention == DENSE:
            return "dense SDPA"
        if self.only:
            return f"only {self.only}"
        return "schedule: " + ", ".join(r.name for r in self.regimes) if self.regimes else "dense SDPA (no schedule)"


@dataclass
class Job:
    """One video of one variant."""

    variant: Variant
    prompt: str
    seed: int
    inputs: dict
    record: dict | None = None
    reused: bool = False


def build_variants(cfg: EvaluateConfig) -> list[Variant]:
    """The reference first, then per candidate its schedule and (per_regime) each regime alone."""
    candidates, taken = [], {REFERENCE}
    for folder in cfg.candidates:
        folder = Path(folder)
        name = safe_name(folder.resolve().name)
        base, n = name, 2
        while name in taken:  # two folders of the same name, or one named `reference`
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        manifest = read_manifest(folder)
        candidates.append((name, folder, manifest, _regimes(folder, manifest)))

    if cfg.reference == DENSE:
        name, folder, manifest, regimes = candidates[0]
        reference = Variant(REFERENCE, f"dense ({name}'s weights)", DENSE, folder, manifest, regimes)
    else:
        folder = Path(cfg.reference)
        manifest = read_manifest(folder)
        regimes = _regimes(folder, manifest)
        attention = "schedule" if cfg.reference_fps and regimes else DENSE
        reference = Variant(REFERENCE, folder.resolve().name, attention, folder, manifest, regimes)

    variants = [reference]
    for name, folder, manifest, regimes in candidates:
        variants.append(Variant(name, name, "schedule" if regimes else DENSE, folder, manifest, regimes))
        if cfg.per_regime:
            variants += [Variant(f"{name}@{r.name}", name, f"regime:{r.name}", folder, manifest, regimes)
                         for r in regimes]
        if cfg.fp8_linears:
            variants.append(Variant(f"{name}.fp8", name, "schedule" if regimes else DENSE, folder, manifest, regimes,
                                    fp8_linears=True))
    keys = [v.key for v in variants]
    if len(set(keys)) != len(keys):  # e.g. candidates `x` and `x.fp8` with fp8_linears=true
        raise ConfigError(f"two results would share a name: {sorted(k for k in keys if keys.count(k) > 1)}; rename "
                          "a candidate's folder")
    in_dims = {v.key: model_config(v.manifest).in_dim for v in variants}
    if len(set(in_dims.values())) > 1:
        raise ConfigError(f"the models' latent channels differ ({in_dims}): their videos cannot start from the same "
                          "noise; evaluate models of one family together")
    return variants


def _regimes(folder: Path, manifest: dict) -> list:
    """The exported schedule's regimes in the order sampling meets them (σ from 1 down); [] without a schedule."""
    schedule = load_schedule(folder, model_config(manifest))
    return sorted(schedule.regimes, key=lambda r: -r.hi) if schedule is not None else []


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run the evaluation `cfg` describes; returns what results.json holds."""
    from fpsa_train.eval.report import write_reports

    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if cfg.fp8_linears:  # before any video is sampled: a host without torchao or FP8 GEMMs is told at once
        from fpsa_train.fp8_linears import check_fp8_available

        check_fp8_available(device)
    variants = build_variants(cfg)
    prompts, seeds = load_prompts(cfg), load_seeds(cfg)
    size = video_size(cfg, variants[1].manifest)
    components = components_folder(cfg.components, variants[1].manifest)
    if cfg.guidance > 1:  # the resolved text, so the videos' keys and the report name what was used
        cfg = dataclasses.replace(cfg, negative_prompt=negative_prompt(cfg.negative_prompt, components))
    store = VideoStore(out)

    jobs = []
    for variant in variants:
        for prompt in prompts:
            for seed in seeds:
                job = Job(variant, prompt, seed, _inputs(cfg, variant, prompt, seed, size, components, device, prompts))
                job.record = store.load_record(variant.key, prompt, seed, job.inputs)
                job.reused = job.record is not None
                jobs.append(job)
    reused = sum(j.reused for j in jobs)
    log.info("evaluate: %d variants × %d prompts × %d seeds = %d videos, %d saved ones reused", len(variants),
             len(prompts), len(seeds), len(jobs), reused)
    _sample_missing(cfg, jobs, device, size, components, store)

    results = _measure(cfg, variants, jobs, prompts, seeds, store, device)
    results["settings"] = {
        "candidates": [str(c) for c in cfg.candidates], "reference": cfg.reference, "reference_model":
        variants[0].model, "reference_attention": variants[0].label, "prompts": cfg.prompts, "num_prompts":
        len(prompts), "seeds": seeds, "steps": cfg.steps, "guidance": cfg.guidance, "shift": cfg.shift,
        "size": {"height": size[0], "width": size[1], "frames": size[2]}, "components": components,
        "device": str(device), "backend": cfg.backend, "per_regime": cfg.per_regime, "fp8_linears": cfg.fp8_linears,
        "kernel_forward": cfg.kernel_forward, "negative_prompt": cfg.negative_prompt if cfg.guidance > 1 else None}
    results["prompts"] = [{"id": prompt_id(p), "index": i, "prompt": p} for i, p in enumerate(prompts)]
    results["schedules"] = {v.key: [r.describe() for r in v.regimes] for v in variants if v.attention == "schedule"}
    results["videos_sampled"], results["videos_reused"] = len(jobs) - reused, reused
    write_reports(results, out, store, variants, prompts, seeds, cfg)
    return results


def _inputs(cfg: EvaluateConfig, variant: Variant, prompt: str, seed: int, size, components: str,
            device: torch.device, prompts: list[str]) -> dict:
    """Everything that decides a video's pixels (the key under which it is reused)."""
    return {"deploy": variant.manifest["manifest_sha256"], "attention": variant.attention, "prompt": prompt,
            "negative_prompt": cfg.negative_prompt if cfg.guidance > 1 else None, "seed": seed, "steps": cfg.steps,
            "guidance": cfg.guidance, "shift": cfg.shift, "size": list(size),
            "components": str(Path(components).resolve()), "device": device.type, "backend": cfg.backend,
            **({"batch": _batch_of(cfg.batch, prompts, prompt, seed)} if cfg.batch > 1 else {}),
            **({"fp8_linears": True} if variant.fp8_linears else {}),
            **({"kernel_forward": cfg.kernel_forward} if cfg.kernel_forward != "triton" else {})}


def _batch_of(batch: int, prompts: list[str], prompt: str, seed: int) -> list[str]:
    """The prompts denoised together with `prompt` at `seed` (itself included): its chunk of the prompt list."""
    start = prompts.index(prompt) // batch * batch
    return [f"{p} @ {seed}" for p in prompts[start:start + batch]]


def _sample_missing(cfg: EvaluateConfig, jobs: list[Job], device: torch.device, size, components: str,
                    store: VideoStore) -> None:
    from fpsa_train.deploy import load_deploy
    from fpsa_train.encoders import Encoders
    from fpsa_train.sample import generate_batch, initial_noise, latent_shape

    pending = [j for j in jobs if j.record is None]
    # a job whose inputs equal another's (a dense candidate against `reference=dense`: the same weights and
    # attention) copies that video instead of sampling it again
    made = {_same(j.inputs): j for j in jobs if j.record is not None}
    twins: dict[int, list[Job]] = {}  # id(job to sample) → the jobs that copy it
    to_sample = []
    for job in pending:
        source = made.setdefault(_same(job.inputs), job)
        if source is job:
            to_sample.append(job)
        elif source.record is not None:
            _copy(store, source, job)
        else:
            twins.setdefault(id(source), []).append(job)
    pending = to_sample
    if not pending:
        return
    enc = Encoders(components, device, model_config(pending[0].variant.manifest).text_len)
    # each prompt embedded with the negative one in one batch, exactly as `python -m fpsa_train.sample` does
    texts = {p: enc.text([p, cfg.negative_prompt] if cfg.guidance > 1 else [p])
             for p in tqdm(dict.fromkeys(j.prompt for j in pending), desc="encoding prompts", unit="prompt")}
    del enc.text_encoder  # UMT5-XXL is 11 GB in bf16; only the VAE is needed from here
    _free(device)

    loaded_key, deployed = None, None
    for variant in dict.fromkeys(j.variant.key for j in pending):
        todo = [j for j in pending if j.variant.key == variant]
        v = todo[0].variant
        if loaded_key != (v.folder, v.attention != DENSE, v.fp8_linears):  # one load per folder for its regimes
            deployed = None
            _free(device)
            deployed = load_deploy(v.folder, device=device, backend=cfg.backend, fps=v.attention != DENSE,
                                   fp8_linears=v.fp8_linears, kernel_forward=cfg.kernel_forward)
            loaded_key = (v.folder, v.attention != DENSE, v.fp8_linears)
        shape = latent_shape(deployed.model.cfg.in_dim, enc.vae, *size)
        with deployed.only_regime(v.only) if v.only else nullcontext(), \
                tqdm(total=len(todo), desc=f"sampling {v.key}", unit="video") as bar:
            for batch in _batches(todo):
                noises = [initial_noise(job.seed, shape, device) for job in batch]
                results = generate_batch(deployed, enc, [texts[job.prompt] for job in batch], noises, cfg.steps,
                                         cfg.shift, cfg.guidance, leave=False)
                for job, noise, result in zip(batch, noises, results):
                    stats = {"attention": deployed.backend, "steps_per_regime": result.steps_per_regime,
                             "seconds_denoising": round(result.seconds_denoising, 4),
                             "seconds_per_step": round(result.seconds_denoising / cfg.steps, 5),
                             "batch": len(batch),
                             "noise_sha256": hashlib.sha256(noise.cpu().numpy().tobytes()).hexdigest(),
                             "trace": [{**t, "sigma": round(t["sigma"], 6), "density": round(t["density"], 6),
                                        "seconds": round(t["seconds"], 5)} for t in result.trace]}
                    job.record = store.save(v.key, job.prompt, job.seed, job.inputs, result.video, stats)
                    for twin in twins.get(id(job), []):
                        _copy(store, job, twin)
                bar.update(len(batch))
    deployed = None
    _free(device)


def _batches(todo: list[Job]) -> list[list[Job]]:
    """The jobs grouped as they are denoised: jobs with the same `batch` key (cfg.batch > 1) together, in order;
    one job per group otherwise. A group is the part of its chunk still to sample (the rest were reused)."""
    groups: dict[str, list[Job]] = {}
    for job in todo:
        key = json.dumps(job.inputs.get("batch")) if "batch" in job.inputs else str(id(job))
        groups.setdefault(key, []).append(job)
    return list(groups.values())


def _same(inputs: dict) -> str:
    return json.dumps(inputs, sort_keys=True, default=str)


def _copy(store: VideoStore, source: Job, job: Job) -> None:
    """`job`'s video is `source`'s (identical inputs): saved under job's variant with source's stats."""
    video = store.load_video(source.variant.key, source.prompt, source.seed)
    job.record = store.save(job.variant.key, job.prompt, job.seed, job.inputs, video, source.record["stats"])


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _measure(cfg: EvaluateConfig, variants: list[Variant], jobs: list[Job], prompts: list[str], seeds: list[int],
             store: VideoStore, device: torch.device) -> dict:
    """Per video and per variant: fidelity to the reference, prompt following, density, seconds per step."""
    from fpsa_train.eval.vbench import vbench_plan

    lpips_reason = metrics.lpips_unavailable()
    lpips = metrics.Lpips(device) if lpips_reason is None else None
    follow_reason = following.analyzer_unavailable()
    names = following.attributes()
    by_key = {(j.variant.key, j.prompt, j.seed): j for j in jobs}
    per_video: dict[str, list] = {v.key: [] for v in variants}
    pairs = [(p, s) for p in prompts for s in seeds]
    for prompt, seed in tqdm(pairs, desc="measuring", unit="prompt×seed"):
        reference = store.load_video(REFERENCE, prompt, seed)
        for v in variants:
            job = by_key[(v.key, prompt, seed)]
            video = reference if v.key == REFERENCE else store.load_video(v.key, prompt, seed)
            stats = job.record["stats"]
            entry = {"prompt_id": prompt_id(prompt), "prompt": prompt, "seed": seed,
                     "video": str(store.paths(v.key, prompt, seed)[0]), "reused": job.reused,
                     "fidelity": None if v.key == REFERENCE else metrics.fidelity(video, reference, device, lpips),
                     "following": following.follow(prompt, video) if follow_reason is None else None,
                     "density_mean": float(np.mean([t["density"] for t in stats["trace"]])),
                     **{k: stats[k] for k in ("seconds_per_step", "attention", "steps_per_regime", "noise_sha256",
                                              "trace")},
                     "batch": stats.get("batch", 1)}
            per_video[v.key].append(entry)

    vbench = vbench_plan() if cfg.vbench else {"available": False, "reason": "vbench=false", "dimensions": [],
                                                 "missing": {}}
    summaries = []
    for v in variants:
        videos = per_video[v.key]
        summary = _summarise(v, videos, names, follow_reason is None)
        summary["vbench"] = _vbench_scores(v, videos, vbench, store, device) if vbench["dimensions"] else None
        summaries.append(summary)
    return {"psnr_cap_db": metrics.PSNR_CAP_DB,
            "lpips": {"available": lpips is not None, "reason": lpips_reason},
            "following": {"available": follow_reason is None, "reason": follow_reason, "attributes": list(names)},
            "vbench": vbench, "variants": summaries, "videos": per_video}


def _summarise(v: Variant, videos: list[dict], names: tuple[str, ...], scored: bool) -> dict:
    fid = [e["fidelity"] for e in videos if e["fidelity"] is not None]
    lpips = [f["lpips"] for f in fid if f["lpips"] is not None]
    steps = np.array([[t["density"] for t in e["trace"]] for e in videos])  # (videos, steps)
    return {"key": v.key, "model": v.model, "regime": v.label, "attention_kind": v.attention,
            "fp8_linears": v.fp8_linears,
            "deploy": str(v.folder), "reference": v.key == REFERENCE,
            "psnr": float(np.mean([f["psnr"] for f in fid])) if fid else None,
            "ssim": float(np.mean([f["ssim"] for f in fid])) if fid else None,
            "lpips": float(np.mean(lpips)) if lpips else None,
            "accuracy": following.accuracy([e["following"] for e in videos], names) if scored else None,
            "density_mean": float(steps.mean()), "density_per_step": steps.mean(0).round(6).tolist(),
            "seconds_per_step": float(np.median([e["seconds_per_step"] for e in videos])),
            "attention": sorted({e["attention"] for e in videos}),
            "videos": len(videos), "sampled": sum(not e["reused"] for e in videos)}


def _vbench_scores(v: Variant, videos: list[dict], plan: dict, store: VideoStore, device) -> dict:
    """VBench's runnable dimensions for one variant; a failure is recorded, not raised (the videos are saved)."""
    from fpsa_train.eval.vbench import run_vbench

    clips = [(f"{e['prompt_id']}-{e['seed']}", store.load_video(v.key, e["prompt"], e["seed"])) for e in videos]
    try:
        return run_vbench(clips, store.root.parent / "vbench" / safe_name(v.key), safe_name(v.key),
                          plan["dimensions"], device)
    except Exception as err:  # a third-party benchmark: report its failure beside the results we have
        log.warning("VBench failed for %s: %s", v.key, err)
        return {"error": f"{type(err).__name__}: {err}"}
