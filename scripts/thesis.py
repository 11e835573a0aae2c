"""The thesis experiment: FP8 + sparse attention applied after training (PTQ) vs trained in the loop (QAT).

    python scripts/thesis.py --base outputs/proving/deploy          # one H200: the proving-ground model
    python scripts/thesis.py --base <deploy> --experiment tiny ...   # the same code path on CPU in seconds (tests)

From the dense model in `--base` (a deploy folder: `python -m fpsa_train.export` of a dense run, or the pack of
`scripts/world_models.py proving`) it builds, for every variant of `VARIANTS` (FP8 only, sparse only, FP8 + sparse at
uniform tile-pair densities 0.5 / 0.25 / 0.125, today's default step-aware schedule, a static window vs dynamic
top-k vs the learned selector at equal density, a step-aware schedule at the cost of uniform 0.25):
- **PTQ**: the dense weights exported with the variant's schedule (no training);
- **QAT**: the dense weights fine-tuned `--qat-steps` steps with the variant's numerics in the loop (the same steps,
  objective and data for every variant), then exported with it; plus **dense_ft**, the same fine-tune with dense
  attention (the control: what more training alone does), and the `--curve` variant's run after fewer steps (its
  own step checkpoints, exported as they are: the same run, not shorter runs).
Every deploy is evaluated with `python -m fpsa_train.evaluate` on the synthetic world's held-out prompts and seeds
against the base's dense videos; `<out>/thesis.md` and `thesis.json` gather the rows (fidelity, prompt following,
realised density) and the recovery of PTQ's loss by QAT. Reruns resume: finished trainings, exports and videos are
reused; a training stopped by `--deadline` continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from world_models import (PREEMPTED, REPO, export_command, prepare_data, same_weights,  # noqa: E402
                          start_checkpoint)

STARTED = time.perf_counter()
Q_TILE = {"group": "tile", "factor": [1, 1, 1]}


def _one(quant, sparsity) -> list[dict]:
    return [{"name": "all", "sigma": [0.0, 1.0], "quant": quant, "sparsity": sparsity}]


def _topk(k: int) -> dict:
    return {"pattern": "topk", "topk": k}


# name → regimes of its schedule (σ = 1 is the first sampling step). Densities are of the proving ground's 3×4×4 = 48
# tiles: top-k keeps k of 48 key tiles per query tile; the window (3, 3, 3) keeps 30.4% of the pairs (edge-clipped).
VARIANTS: dict[str, list[dict]] = {
    "fp8": _one(Q_TILE, {"pattern": "dense"}),
    "sparse_k12": _one(None, _topk(12)),
    "fp8_k24": _one(Q_TILE, _topk(24)),
    "fp8_k12": _one(Q_TILE, _topk(12)),
    "fp8_k6": _one(Q_TILE, _topk(6)),
    "default": "configs/fps/default.yaml",
    "sparse": "configs/fps/sparse.yaml",  # the shipped sparse schedule (calibrated after QAT: docs/results.md)
    "fp8_window333": _one(Q_TILE, {"pattern": "window", "window": [3, 3, 3]}),
    "fp8_k15": _one(Q_TILE, _topk(15)),
    "fp8_learned30": _one(Q_TILE, {"pattern": "learned", "window": [3, 3, 3], "target_density": 0.3}),
    # 50 UniPC steps at shift 5 spend 36% / 54% / 10% in these σ ranges: 0.36·6/48 + 0.54·16/48 + 0.10·12/48 = 0.25
    "fp8_stepaware25": [
        {"name": "early", "sigma": [0.9, 1.0], "quant": Q_TILE, "sparsity": _topk(6)},
        {"name": "middle", "sigma": [0.4, 0.9], "quant": Q_TILE, "sparsity": _topk(16)},
        {"name": "late", "sigma": [0.0, 0.4], "quant": Q_TILE, "sparsity": _topk(12)},
    ],
}
# today's default schedule with one of its regimes applied and dense attention in the other σ ranges (PTQ only)
for _i, _regime in enumerate(("early", "middle", "late")):
    _spec = yaml.safe_load((REPO / "configs/fps/default.yaml").read_text())["regimes"]
    VARIANTS[f"default_{_regime}"] = [dict(r, quant=None, sparsity={"pattern": "dense"}) if j != _i else r
                                      for j, r in enumerate(_spec)]
NO_PTQ = ("fp8_learned30",)  # an untrained selector is not a training-free method
NO_QAT = ("default_early", "default_middle", "default_late")
CONTROL = "dense_ft"


def schedule_file(name: str, folder: Path, grid_note: str = "") -> Path:
    spec = VARIANTS[name]
    if isinstance(spec, str):
        return (REPO / spec).resolve()
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# thesis variant {name}{grid_note}\n" + yaml.safe_dump({"enabled": True, "regimes": spec},
                                                                               sort_keys=False))
    return path


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    """`cmd` started in the repo, its output appended to `log` (the file closes with the child's copy)."""
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"))
    with open(log, "a") as out:
        return subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def run_all(jobs: list[tuple[str, list[str], Path]], parallel: int, until: float | None) -> dict[str, int]:
    """Run (name, cmd, log) jobs, `parallel` at a time; at `until` (perf_counter) the running ones get SIGTERM
    (training then checkpoints and exits 143) and the queued ones are not started. Returns name → exit status."""
    queue, running, status = list(jobs), {}, {}
    while queue or running:
        now = time.perf_counter()
        while queue and len(running) < parallel and (until is None or now < until):
            name, cmd, log = queue.pop(0)
            running[name] = launch(cmd, log)
        if until is not None and now >= until:
            for p in running.values():
                if p.poll() is None:
                    p.terminate()
            queue.clear()
        for name, p in list(running.items()):
            if p.poll() is not None:
                status[name] = p.returncode
                del running[name]
        time.sleep(1.0)
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the dense model's deploy folder")
    parser.add_argument("--experiment", default="proving", help="training experiment (its data and model)")
    parser.add_argument("--out", default="outputs/thesis")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of VARIANTS")
    parser.add_argument("--qat-variants", default=None,
                        help="the variants also fine-tuned (default: all of --variants)")
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--curve", default="fp8_k12:50,100",
                        help="VARIANT:N1,N2: that variant's QAT run also evaluated at these steps (its checkpoints); "
                             "'-' for none")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--teacher", default="dense", help="objective.teacher of every fine-tune (dense or none)")
    parser.add_argument("--distill-weight", type=float, default=1.0,
                        help="objective.distill_weight: 1 = pure self-distillation (the dense control then stays the "
                             "base); at 0.5 (half the data's target) 150 steps moved the dense control's videos to "
                             "24 dB from the base's, more than FP8 did (docs/results.md)")
    parser.add_argument("--parallel", type=int, default=6, help="trainings / evaluations at once on the one GPU")
    parser.add_argument("--deadline", type=float, default=None, help="seconds for this call (then stop; rerun)")
    parser.add_argument("--reserve", type=float, default=150.0, help="seconds of the deadline kept for evaluation")
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--eval-seeds", default="[1000]")
    parser.add_argument("--eval-prompts", type=int, default=None)
    parser.add_argument("--eval-batch", type=int, default=8, help="evaluate's batch: videos denoised together")
    parser.add_argument("--train-backend", default="auto",
                        help="fps.backend of the fine-tunes (auto: the Hopper kernel where it runs the regime, "
                             "else the PyTorch reference)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra evaluate option, repeatable (e.g. components=..., height=32)")
    parser.add_argument("--no-qat", action="store_true")
    parser.add_argument("--no-ptq", action="store_true", help="skip the training-free exports (measured elsewhere)")
    parser.add_argument("--data-only", action="store_true",
                        help="only build the experiment's data cache (before running several --out side by side)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every fine-tune")
    args = parser.parse_intermixed_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.base).resolve()
    weights = base / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise SystemExit(f"--base {base}: no diffusion_pytorch_model.safetensors (give an exported deploy folder)")
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    curve_name, curve_steps = args.curve.split(":", 1) if ":" in args.curve else ("", "")  # "" or "-": none
    curve = [int(s) for s in curve_steps.split(",") if s] if curve_name in names else []
    py, log = sys.executable, out / "thesis.log"
    deadline = None if args.deadline is None else STARTED + args.deadline
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    report.update({"base": str(base), "experiment": args.experiment, "qat_steps": args.qat_steps,
                   "teacher": args.teacher, "distill_weight": args.distill_weight, "lr": args.lr})
    schedules = {n: schedule_file(n, out / "schedules") for n in names}
    common = [f"+experiment={args.experiment}", f"model.weights={weights}", *args.overrides]

    t = time.perf_counter()
    prepare_data(args.experiment, common[1:])
    report.setdefault("seconds", {})["data"] = round(time.perf_counter() - t, 1)
    if args.data_only:
        return

    # PTQ: the dense weights under each schedule (exported from a checkpoint of the weights as they are)
    candidates = {}
    if not args.no_ptq:
        start = start_checkpoint(py, common, out / "start", log)
        ptq = {f"ptq_{n}": [f"schedule_file={schedules[n]}"] for n in names if n not in NO_PTQ}
        candidates = exports(py, {k: (start, extra) for k, extra in ptq.items()}, out, args.parallel)
        for key, deploy in candidates.items():
            same_weights(deploy / "diffusion_pytorch_model.safetensors", weights, key)

    # QAT: every variant (and the dense control) fine-tuned the same way, `parallel` at a time
    if not args.no_qat:
        qat = names if args.qat_variants is None else [n for n in args.qat_variants.split(",") if n in names]
        runs = [(n, args.qat_steps) for n in qat if n not in NO_QAT] + [(CONTROL, args.qat_steps)]
        jobs = []
        for n, steps in runs:
            key = f"qat_{n}"
            folder = out / "runs" / key
            settings = {"teacher": args.teacher, "distill_weight": args.distill_weight, "lr": args.lr,
                        "steps": steps, "train_backend": args.train_backend, "overrides": args.overrides,
                        "base": str(weights)}
            record = out / "runs" / f"{key}.settings.json"
            if record.exists() and json.loads(record.read_text()) != settings:
                raise SystemExit(f"{folder} was trained with {record.read_text().strip()}, not {settings}: use "
                                 "another --out for different fine-tuning settings")
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(settings) + "\n")
            if (folder / "summary.json").exists():
                continue
            fps = (["fps=dense"] if n == CONTROL else
                   ["fps=default", f"fps.schedule_file={schedules[n]}", f"fps.backend={args.train_backend}"])
            every, keep = min(steps, 25), 2
            if n == curve_name and curve:  # its run keeps a checkpoint at each curve step (~80 MB each here)
                every = math.gcd(steps, *curve)
                keep = steps // every + 1
            jobs.append((key, [py, "-m", "fpsa_train", *common, f"hydra.run.dir={folder}", *fps,
                               f"objective.teacher={args.teacher}", f"objective.distill_weight={args.distill_weight}",
                               f"optim.lr={args.lr}", "optim.warmup_steps=20", f"trainer.max_steps={steps}",
                               "trainer.val_every_n_steps=1000000", "data.num_workers=1",
                               f"trainer.checkpoint_every_n_steps={every}", f"trainer.keep_checkpoints={keep}"],
                         out / "runs" / f"{key}.log"))
        (out / "runs").mkdir(parents=True, exist_ok=True)
        until = None if deadline is None else deadline - args.reserve
        if jobs and until is not None and until - time.perf_counter() < 90:
            print(f"warning: {max(0.0, until - time.perf_counter()):.0f} s left for the fine-tunes before the "
                  "evaluation's reserve (the first steps alone compile the kernels for ~20 s): they will stop early; "
                  "raise --deadline, lower --reserve, or rerun to continue them", flush=True)
        t = time.perf_counter()
        status = run_all(jobs, args.parallel, until)
        report["seconds"]["qat"] = round(report["seconds"].get("qat", 0) + time.perf_counter() - t, 1)
        report["failed"] = {k: c for k, c in status.items() if c and c not in (PREEMPTED, -15)}
        if report["failed"]:
            print(f"fine-tunes failed (left out; logs in {out / 'runs'}): {report['failed']}")
        from fpsa_train.lit.checkpointing import step_name
        from fpsa_train.lit.resume import checkpoint_step

        trained, report["qat_steps_done"] = {}, {}
        for n, steps in runs:
            key = f"qat_{n}"
            ckpt = out / "runs" / key / "checkpoints" / "last.ckpt"
            if key in report["failed"] or not ckpt.exists():
                continue
            report["qat_steps_done"][key] = checkpoint_step(ckpt)  # fewer than asked when the deadline stopped it
            if not (out / "runs" / key / "summary.json").exists():
                print(f"{key}: stopped at step {report['qat_steps_done'][key]} (rerun to continue); evaluated as is")
            trained[key] = (ckpt, [])
            for s in (curve if n == curve_name else []):
                if (out / "runs" / key / "checkpoints" / step_name(s)).exists():
                    trained[f"{key}_{s}"] = (out / "runs" / key / "checkpoints" / step_name(s), [])
                    report["qat_steps_done"][f"{key}_{s}"] = s
        candidates.update(exports(py, trained, out, args.parallel))

    # evaluation: groups of candidates at once, each against the base's dense videos
    t = time.perf_counter()
    evaluate(py, candidates, base, out, args, log)
    report["seconds"]["eval"] = round(report["seconds"].get("eval", 0) + time.perf_counter() - t, 1)
    report["seconds"]["total_this_call"] = round(time.perf_counter() - STARTED, 1)
    rows = gather(out, candidates)
    report["rows"] = rows
    report["recovery"] = recovery(rows)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "thesis.md").write_text(table(rows, report))
    print((out / "thesis.md").read_text())


def exports(py: str, todo: dict[str, tuple[Path, list[str]]], out: Path, parallel: int) -> dict[str, Path]:
    """`python -m fpsa_train.export` (live weights) of each key's checkpoint into out/deploys/<key>, `parallel` at
    a time; a deploy exported from the same checkpoint file before (<key>.source: its mtime) is kept. Returns
    key → deploy folder."""
    jobs, done = [], {}
    for key, (ckpt, extra) in todo.items():
        deploy = out / "deploys" / key
        stamp = out / "deploys" / f"{key}.source"
        if not (stamp.exists() and stamp.read_text() == str(ckpt.stat().st_mtime_ns)):
            jobs.append((key, export_command(py, ckpt, out / "deploys", key, "weights=live", *extra),
                         out / "deploys" / f"{key}.log"))
        done[key] = deploy
    (out / "deploys").mkdir(parents=True, exist_ok=True)
    status = run_all(jobs, parallel, None)
    for key, code in status.items():
        if code:
            raise SystemExit(f"export {key} failed ({code}); log: {out / 'deploys' / (key + '.log')}")
        (out / "deploys" / f"{key}.source").write_text(str(todo[key][0].stat().st_mtime_ns))
    return done


def evaluate(py: str, candidates: dict[str, Path], base: Path, out: Path, args, log: Path) -> None:
    """The candidates' evaluation against `base` dense, in `parallel` groups side by side on the one GPU (each
    group samples the base's dense videos itself: cheap next to the candidates); reruns reuse every video made."""
    keys = sorted(candidates)
    groups = [keys[i::args.parallel] for i in range(min(args.parallel, len(keys)))]
    jobs = []
    for i, group in enumerate(groups):
        folder = out / "eval" / f"group{i}"
        cmd = [py, "-m", "fpsa_train.evaluate", f"candidates=[{','.join(str(candidates[k]) for k in group)}]",
               f"reference={base}", "reference_fps=false", "prompts=heldout", f"steps={args.eval_steps}",
               f"seeds={args.eval_seeds}", f"batch={args.eval_batch}", f"out={folder}", f"hydra.run.dir={folder}"]
        cmd += ([f"max_prompts={args.eval_prompts}"] if args.eval_prompts else []) + args.eval_override
        jobs.append((f"eval{i}", cmd, out / "eval" / f"group{i}.log"))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    status = run_all(jobs, args.parallel, None)
    failed = {k: c for k, c in status.items() if c}
    if failed:
        raise SystemExit(f"evaluations failed: {failed}; logs in {out / 'eval'}")


def gather(out: Path, candidates: dict[str, Path]) -> list[dict]:
    """One row per candidate (and the reference) from the groups' results.json."""
    by_deploy = {str(v): k for k, v in candidates.items()}
    rows, reference = [], None
    for results in sorted((out / "eval").glob("group*/results.json")):
        for v in json.loads(results.read_text())["variants"]:
            row = {k: v[k] for k in ("psnr", "ssim", "accuracy", "density_mean", "seconds_per_step", "regime")}
            if v["reference"]:
                reference = reference or dict(row, key="dense")
            elif v["deploy"] in by_deploy:
                rows.append(dict(row, key=by_deploy[v["deploy"]]))
    return ([reference] if reference else []) + sorted(rows, key=lambda r: r["key"])


def recovery(rows: list[dict]) -> dict:
    """Per variant with both a PTQ and a QAT row: the fraction of PTQ's loss that QAT recovers, in MSE against the
    dense videos (PSNR's linear form: 1 − MSE_qat / MSE_ptq) and in prompt accuracy (all attributes right:
    (acc_qat − acc_ptq) / (acc_dense − acc_ptq)), and the same net of the dense control's change."""
    by = {r["key"]: r for r in rows}
    dense, control = by.get("dense"), by.get(f"qat_{CONTROL}")
    result = {}
    for key in by:
        if not key.startswith("ptq_") or f"qat_{key[4:]}" not in by:
            continue
        ptq, qat = by[key], by[f"qat_{key[4:]}"]
        mse = lambda r: 10 ** (-r["psnr"] / 10)  # noqa: E731 (data range 1)
        entry = {"mse_recovered": 1 - mse(qat) / mse(ptq)}
        if dense:
            lost = dense["accuracy"]["all"] - ptq["accuracy"]["all"]
            gained = qat["accuracy"]["all"] - ptq["accuracy"]["all"]
            entry["accuracy_lost"] = lost
            entry["accuracy_recovered"] = gained / lost if lost > 0 else None
            if control:
                extra = control["accuracy"]["all"] - dense["accuracy"]["all"]
                entry["accuracy_recovered_net_of_control"] = (gained - extra) / lost if lost > 0 else None
        result[key[4:]] = entry
    return result


def table(rows: list[dict], report: dict) -> str:
    lines = [f"# Thesis experiment: base {report['base']}, {report['qat_steps']} QAT steps (teacher "
             f"{report['teacher']}, distill weight {report['distill_weight']}, lr {report['lr']})", "",
             "| variant | QAT steps | PSNR (dB) | SSIM | colour | shape | direction | all | density | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"] or {}
        psnr = "—" if r["psnr"] is None else f"{r['psnr']:.2f}"
        ssim = "—" if r["ssim"] is None else f"{r['ssim']:.4f}"
        steps = report.get("qat_steps_done", {}).get(r["key"], "—")
        lines.append(f"| {r['key']} | {steps} | {psnr} | {ssim} | {a.get('colour', 0):.2f} | {a.get('shape', 0):.2f} | "
                     f"{a.get('direction', 0):.2f} | {a.get('all', 0):.2f} | {r['density_mean']:.3f} | "
                     f"{r['seconds_per_step']:.3f} |")
    lines += ["", "Recovery of PTQ's loss by QAT:", "", "```", json.dumps(report["recovery"], indent=1), "```",
              "", f"Seconds: {report['seconds']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
