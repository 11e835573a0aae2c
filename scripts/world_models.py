"""Train the synthetic world's models on a GPU, export them, and measure how well they follow their prompts.

    python scripts/world_models.py demo_base   # world_s from scratch, 128×128×17 (assets/demo_base)
    python scripts/world_models.py proving     # world_s from demo_base at 256×256×17, 48 tiles: the proving ground
    python scripts/world_models.py demo_qat --vs-start configs/fps/default.yaml
                                               # demo_base fine-tuned with FPS attention in the loop

Each is one command that reruns safely: training resumes from its newest checkpoint (a rerun after the last step is
a no-op), the data cache is built once under .fpsa_data/ (encoded by the shipped assets/world_components), and
evaluation reuses the videos it already made. Steps per phase, wall times and the held-out accuracy go to
`<out>/report.json` (and the printed summary); `--pack DIR` also writes what later work reuses without
retraining: the exported weights (bf16, Wan layout) and the tiny encoders as one tar.gz per model, each under the
16 MB a device call can bring back.

Held out: the evaluation uses the synthetic world's held-out prompts and seeds
(fpsa_train/data/synthetic_video.py), which the clip generator never produces for training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()
WHICH = ("demo_base", "proving", "demo_qat")


PREEMPTED = 143  # python -m fpsa_train's exit status after a SIGTERM: checkpoint written, rerun to continue


def run(cmd: list[str], log: Path, budget: float | None = None) -> tuple[float, bool]:
    """Run `cmd` in the repo, tee its output to `log`; return (wall time, stopped by the budget). After `budget`
    seconds it gets SIGTERM: training then writes a checkpoint at the next step and exits 143, and a rerun of this
    script continues it (so a run longer than one device call spans several). Raises on any other failure."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = None
        if budget is not None:
            timer = threading.Timer(max(budget, 0.0), proc.send_signal, args=(signal.SIGTERM,))
            timer.start()
        for line in proc.stdout:
            f.write(line)
            if "it/s" not in line and "s/it" not in line:  # progress bars stay in the log
                sys.stdout.write(line)
        proc.wait()
        if timer is not None:
            timer.cancel()
    stopped = budget is not None and proc.returncode in (PREEMPTED, -signal.SIGTERM)
    if proc.returncode and not stopped:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; log: {log}")
    return time.perf_counter() - start, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=WHICH)
    parser.add_argument("--out", default=None, help="run folder (default outputs/<which>)")
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the experiment's)")
    parser.add_argument("--eval-steps", type=int, default=30, help="denoising steps of the evaluation")
    parser.add_argument("--eval-prompts", type=int, default=None, help="only the first N held-out prompts")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of training in this call: then SIGTERM (checkpoint, exit), rerun to continue")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole command: the data is prepared first, then training gets what "
                             "is left minus --reserve (as --budget)")
    parser.add_argument("--reserve", type=float, default=180.0, help="seconds kept for export and evaluation")
    parser.add_argument("--eval-seeds", default=None, help="e.g. [1000,1001] (default: all held-out seeds)")
    parser.add_argument("--training-free", default=None, metavar="SCHEDULE",
                        help="export the dense model with this FPS schedule too (e.g. configs/fps/default.yaml) and "
                             "evaluate it against its dense self, per regime (FP8 + sparsity applied after training; "
                             "the evaluation's reference row is the dense model's own prompt following)")
    parser.add_argument("--vs-start", default=None, metavar="SCHEDULE",
                        help="for a run that starts from model.weights: evaluate the trained model (its own "
                             "schedule) and the starting weights with this schedule applied untrained, both against "
                             "the starting weights' dense videos (what training with the numerics in the loop "
                             "recovers)")
    parser.add_argument("--pack", default=None, help="write <which>.tar.gz (weights + encoders) into this folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for training")
    args = parser.parse_intermixed_args()

    out = Path(args.out or f"outputs/{args.which}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "world_models.log"
    py = sys.executable
    report: dict = {"which": args.which, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    train = [py, "-m", "fpsa_train", f"+experiment={args.which}", f"hydra.run.dir={out / 'train'}", *args.overrides]
    if args.steps is not None:
        train.append(f"trainer.max_steps={args.steps}")
    budget = args.budget
    if args.deadline is not None:
        report["data_seconds"] = round(prepare_data(args.which, args.overrides), 1)
        left = args.deadline - (time.perf_counter() - STARTED) - args.reserve
        budget = left if budget is None else min(budget, left)
        report["train_budget_seconds"] = round(budget, 1)
    seconds, stopped = run(train, log, budget)
    report["train_seconds"] = round(seconds, 1)
    summary, ckpt = out / "train" / "summary.json", out / "train" / "checkpoints" / "last.ckpt"
    report["train"] = json.loads(summary.read_text()) if summary.exists() and not stopped else {}
    if stopped:  # the checkpoint written at the stop is exported and evaluated; a rerun continues the training
        if not ckpt.exists():
            report["train"] = {"stopped_by_budget": True, "note": "stopped before the first checkpoint; rerun"}
            _write(out, report)
            return
        from fpsa_train.lit.resume import checkpoint_step

        step = checkpoint_step(ckpt)
        report["train"] = {"stopped_by_budget": True, "steps": step, "note": "rerun the same command to continue"}

    def export(name: str, *extra: str) -> float:
        return export_deploy(py, ckpt, out, name, log, *extra)

    def evaluate(deploy: Path, name: str, *extra: str) -> float:
        return evaluate_vs([deploy], "dense", name, *extra)

    def evaluate_vs(candidates: list[Path], reference: str | Path, name: str, *extra: str) -> float:
        cmd = [py, "-m", "fpsa_train.evaluate", f"candidates=[{','.join(map(str, candidates))}]",
               f"reference={reference}", "reference_fps=false", "prompts=heldout", f"steps={args.eval_steps}",
               f"out={out / name}", f"hydra.run.dir={out / name}", *extra]
        cmd += [f"max_prompts={args.eval_prompts}"] if args.eval_prompts else []
        cmd += [f"seeds={args.eval_seeds}"] if args.eval_seeds else []
        seconds = run(cmd, log)[0]
        report[name] = _variants(out / name / "results.json")
        return seconds

    deploy = out / "deploy"
    report["export_seconds"] = round(export("deploy"), 1)
    if not args.no_eval and not args.training_free and not args.vs_start:  # (those have a dense reference row)
        report["eval_seconds"] = round(evaluate(deploy, "eval"), 1)
    if args.training_free:
        export("deploy_training_free", f"schedule_file={Path(args.training_free).resolve()}")
        report["eval_training_free_seconds"] = round(
            evaluate(out / "deploy_training_free", "eval_training_free", "per_regime=true"), 1)
    if args.vs_start:
        start = start_deploys(py, args.which, args.overrides, out, log, Path(args.vs_start).resolve())
        report["start"] = start
        report["eval_vs_start_seconds"] = round(evaluate_vs(
            [deploy, out / "deploy_start_fps"], out / "deploy_start", "eval_vs_start"), 1)
    if args.pack:
        report["pack"] = pack(args.which, deploy, _components(out), Path(args.pack))
    _write(out, report)


def start_deploys(py: str, which: str, overrides: list[str], out: Path, log: Path, schedule: Path) -> dict:
    """The run's starting weights (model.weights) as two deploy folders: `deploy_start` (dense) and
    `deploy_start_fps` (`schedule` applied, untrained). Made by one optimizer step at lr 1e-12 with dense attention
    and exported as the live weights in bf16, then checked to be bit-identical to the starting file."""
    folder = out / "start"
    started = time.perf_counter()
    ckpt = start_checkpoint(py, [f"+experiment={which}", *overrides], folder, log)
    export_deploy(py, ckpt, out, "deploy_start", log, "weights=live")
    export_deploy(py, ckpt, out, "deploy_start_fps", log, "weights=live", f"schedule_file={schedule}")
    model = _run_config(folder)["model"]
    source = model.get("weights") or model["checkpoint"]  # a run recorded before model.checkpoint became weights
    same_weights(out / "deploy_start" / "diffusion_pytorch_model.safetensors", REPO / source, "deploy_start")
    return {"source": source, "seconds": round(time.perf_counter() - started, 1), "bit_identical": True}


def start_checkpoint(py: str, train_args: list[str], folder: Path, log: Path) -> Path:
    """A checkpoint holding a run's starting weights (model.weights): one optimizer step at lr 1e-12 with dense
    attention, whose live weights export bit for bit as the starting file (check with `same_weights`). Reused
    when `folder` has it already."""
    ckpt = folder / "checkpoints" / "last.ckpt"
    if not ckpt.exists():
        run([py, "-m", "fpsa_train", *train_args, f"hydra.run.dir={folder}", "fps=dense", "objective.teacher=none",
             "optim.lr=1e-12", "optim.warmup_steps=0", "trainer.max_steps=1", "trainer.val_every_n_steps=1000000"],
            log)
    return ckpt


def same_weights(made: Path, source: Path, what: str) -> None:
    """Raise unless the safetensors files `made` and `source` hold the same tensors bit for bit."""
    from safetensors.torch import load_file

    a, b = load_file(str(made)), load_file(str(source))
    differ = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or a[k].dtype != b[k].dtype
                    or not a[k].equal(b[k]))
    if differ:
        raise SystemExit(f"{what} is not {source} bit for bit: {len(differ)} tensors differ, e.g. {differ[:3]}")


def prepare_data(which: str, overrides: list[str]) -> float:
    """Build the experiment's data cache (clips, tiny encoders, latents) in this process, as training's first step
    would; returns its wall time. Separate so that a --deadline can give training what the data left over."""
    from hydra import compose, initialize_config_dir

    import fpsa_train.config  # noqa: F401  (registers the schema)
    from fpsa_train.config import resolve
    from fpsa_train.data.prepare import prepare_video_data

    start = time.perf_counter()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        conf = resolve(compose(config_name="train", overrides=[f"+experiment={which}", *overrides, "run_dir=/tmp"]))
    os.chdir(REPO)
    if conf.data.kind == "videos":  # (synthetic latents need no cache)
        prepare_video_data(conf.data, conf.model.text_len)
    return time.perf_counter() - start


def _variants(results: Path) -> list[dict]:
    """Each evaluated variant's summary row (fidelity, accuracy, density, speed) from an evaluation's results.json."""
    return [{k: v for k, v in row.items() if k not in ("trace", "density_per_step")}
            for row in json.loads(results.read_text())["variants"]]


def _write(out: Path, report: dict) -> None:
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def _run_config(run_dir: Path) -> dict:
    """The config a training run recorded (Hydra's .hydra/config.yaml in its run folder)."""
    import yaml

    return yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())


def _components(out: Path) -> Path:
    """The encoders the run trained with (its data.components, from the checkpoint-side config record)."""
    return (REPO / _run_config(out / "train")["data"]["components"]).resolve()


def export_deploy(py: str, ckpt: Path, out: Path, name: str, log: Path, *extra: str) -> float:
    """`python -m fpsa_train.export` of `ckpt` into `out/name` (replacing it); returns its wall time."""
    return run(export_command(py, ckpt, out, name, *extra), log)[0]


def export_command(py: str, ckpt: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [py, "-m", "fpsa_train.export", f"checkpoint={ckpt}", f"out={out / name}", "overwrite=true", *extra,
            f"hydra.run.dir={out / ('export' + name.removeprefix('deploy'))}"]


def pack(which: str, deploy: Path, components: Path, dest: Path) -> str:
    """`<dest>/<which>.tar.gz`: the deploy folder's weights and config and the tiny encoders (components/)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{which}.tar.gz"
    with tarfile.open(target, "w:gz") as tar:
        for name in ("diffusion_pytorch_model.safetensors", "config.json", "manifest.json", "schedule.json"):
            if (deploy / name).exists():
                tar.add(deploy / name, arcname=name)
        tar.add(components, arcname="components")
    size = os.path.getsize(target)
    if size > 16 * 2**20:
        print(f"warning: {target} is {size / 2**20:.1f} MiB, above the 16 MiB a device call brings back")
    return f"{target} ({size / 2**20:.2f} MiB)"


if __name__ == "__main__":
    main()
