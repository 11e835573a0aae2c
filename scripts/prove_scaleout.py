"""Scale-out proof on two GPUs: two processes launched as two nodes (torchrun, node ranks 0 and 1, master on
loopback, one GPU each), DeepSpeed ZeRO-3, `python -m fpsa_train` exactly as a user runs it.

`--model 1.3b` (Wan-1.3B-size DiT, random init, synthetic latents at 480p = 32,760 tokens, batch 1 per GPU):
  1. FPS attention on (fps=default): train, kill -9 both nodes after the step-`--kill-after` checkpoint,
     rerun the same command, which resumes and finishes `--steps` steps;
  2. dense bf16 attention (fps=dense), same strategy, in the same job: the baseline.
  Reports per run the median over steady-state steps of step time, tokens/s per GPU and peak GPU memory (from
  the TrainingMonitor's metrics.csv), and checks the resumed run restarted from the checkpoint's step.
`--model 14b` (Wan-14B-size DiT, random init, 720p = 75,600 tokens): `--steps` steps with `--trainer`
  (zero3 or zero3_offload); reports whether they ran and their step time and peak memory, or the error.

Writes `<out>/scaleout_<model>.json` and each run's log. Usage (on a 2-GPU host):
    python scripts/prove_scaleout.py --model 1.3b --out $OUT
    python scripts/prove_scaleout.py --model 14b --trainer zero3_offload --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["model.weights=null", "trainer.num_nodes=2", "trainer.devices=1", "trainer.log_every_n_steps=1",
          "trainer.val_every_n_steps=100000", "data.val_samples=2", "data.num_samples=64",
          "logger.wandb=false", "logger.tensorboard=false", "optim.warmup_steps=5"]


def launch(run_dir: Path, overrides: list[str], log: Path, port: int) -> list[subprocess.Popen]:
    """Both 'nodes': torchrun with node rank 0 and 1 on loopback, each seeing one GPU."""
    procs = []
    for node in (0, 1):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(node), "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "fpsa_train", *overrides, f"hydra.run.dir={run_dir}"]
        out = open(log.with_suffix(f".node{node}.log"), "a")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            kill([p])
    return [p.returncode for p in procs]


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each launcher and every process under it: torchrun starts its workers in sessions of their own, so
    killing the launcher's process group alone leaves them training."""
    import psutil

    victims = []
    for p in procs:
        try:
            victims += [p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


class HostMemory:
    """Peak host memory in use (MemTotal − MemAvailable from /proc/meminfo, sampled every second), in GiB."""

    def __init__(self):
        self.peak_gib, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
            used = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
            self.peak_gib = max(self.peak_gib, used / 2**20)
            self._stop.wait(1.0)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak_gib, 1)


def steady(run_dir: Path, skip: int) -> dict:
    """Medians over logged steps (the last row of a step wins; the first `skip` steps are warm-up)."""
    rows: dict[int, dict] = {}
    path = run_dir / "logs" / "metrics.csv"
    if not path.exists():
        return {"error": f"no {path}"}
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v and k != "step"})
    keys = ("train/step_time_s", "train/tokens_per_s_per_gpu", "gpu/mem_max_allocated_gib", "train/loss")
    out = {"steps_logged": len(rows)}
    for key in keys:
        values = [r[key] for s, r in sorted(rows.items()) if s >= skip and key in r]
        if values:
            out[key] = {"median": statistics.median(values), "n": len(values), "max": max(values)}
    return out


def dump(report: dict, out: Path, name: str) -> None:
    """Written after every phase, so a run stopped by its time limit still leaves what it measured."""
    (out / f"scaleout_{name}.json").write_text(json.dumps(report, indent=2))


SMOKE = ["+experiment=tiny", "data=synthetic", "trainer.accelerator=cpu", "trainer.precision=32-true",
         "data.latent_frames=3", "data.latent_height=8", "data.latent_width=8"]


def prove_13b(args, out: Path) -> dict:
    base = ["+experiment=wan1_3b", f"trainer={args.trainer}", *COMMON]
    if args.smoke:  # the same harness on CPU ranks with the tiny model (a rehearsal for the GPU run)
        base = [*SMOKE, f"trainer={args.trainer}", *COMMON[1:]]
    report: dict = {"model": "wan1_3b (random init)", "tokens_per_sample": 32760, "trainer": args.trainer}
    fps_dir, dense_dir = Path(args.work) / "fps", Path(args.work) / "dense"
    fps = [*base, "fps=default", f"trainer.max_steps={args.steps}",
           f"trainer.checkpoint_every_n_steps={args.kill_after}"]
    started = time.time()
    procs = launch(fps_dir, fps, out / "fps_first", args.port)
    target = fps_dir / "checkpoints" / f"step{args.kill_after:07d}.ckpt"
    while not target.exists() and all(p.poll() is None for p in procs) and time.time() - started < args.timeout:
        time.sleep(0.5)
    time.sleep(args.kill_delay)  # let it train past the checkpoint, then pull the plug
    alive = [p.poll() is None for p in procs]
    kill(procs)
    report["kill"] = {"checkpoint_existed": target.exists(), "both_alive_at_kill": all(alive),
                      "seconds_to_kill": round(time.time() - started, 1)}
    dump(report, out, "1_3b")
    codes = wait(launch(fps_dir, fps, out / "fps_resumed", args.port + 1), args.timeout)
    log = (out / "fps_resumed.node0.log").read_text(errors="replace")
    report["resume"] = {"exit_codes": codes, "resumed_log_line": next(
        (line.strip() for line in log.splitlines() if "resuming from" in line.lower()), None),
        "finished": f"'steps': {float(args.steps)}" in log and "resumed_from': '" in log}
    report["fps"] = steady(fps_dir, skip=3)
    dump(report, out, "1_3b")
    dense = [*base, "fps=dense", f"trainer.max_steps={args.dense_steps}", "trainer.checkpoint_every_n_steps=100000"]
    report["dense_exit_codes"] = wait(launch(dense_dir, dense, out / "dense", args.port + 2), args.timeout)
    report["dense"] = steady(dense_dir, skip=3)
    try:
        report["fps_step_time_vs_dense"] = (report["dense"]["train/step_time_s"]["median"]
                                            / report["fps"]["train/step_time_s"]["median"])
    except KeyError:
        pass
    return report


def prove_14b(args, out: Path) -> dict:
    run = [*(["+experiment=wan14b"]), f"trainer={args.trainer}", *COMMON, "fps=default",
           f"trainer.max_steps={args.steps}", "trainer.checkpoint_every_n_steps=100000",
           f"optim.ema_decay={args.ema_decay}"]
    run += args.extra
    started, host = time.time(), HostMemory()
    codes = wait(launch(Path(args.work) / "14b", run, out / "wan14b", args.port), args.timeout)
    report = {"model": "wan14b (random init)", "tokens_per_sample": 75600, "trainer": args.trainer,
              "overrides": run, "exit_codes": codes, "seconds": round(time.time() - started, 1),
              "host_memory_peak_gib": host.stop(), "metrics": steady(Path(args.work) / "14b", skip=0)}
    log = (out / "wan14b.node0.log").read_text(errors="replace").splitlines()
    report["errors"] = [line for line in log if "Error" in line or "out of memory" in line.lower()][-5:]
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["1.3b", "14b"], required=True)
    ap.add_argument("--trainer", default="zero3")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--dense-steps", type=int, default=12)
    ap.add_argument("--kill-after", type=int, default=10)
    ap.add_argument("--kill-delay", type=float, default=6.0)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--port", type=int, default=29510)
    ap.add_argument("--work", default="/tmp/fpsa_scaleout")
    ap.add_argument("--out", default="outputs/scaleout")
    ap.add_argument("--smoke", action="store_true", help="--model 1.3b's harness with the tiny model on CPU")
    ap.add_argument("extra", nargs="*", help="more overrides for the 14B run")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = prove_13b(args, out) if args.model == "1.3b" else prove_14b(args, out)
    text = json.dumps(report, indent=2)
    (out / f"scaleout_{args.model.replace('.', '_')}.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
