"""Export a Wan-size DiT, load it with the deploy runtime, and time one denoising step against dense bf16, one run.

1. A training checkpoint as fpsa writes it (state dict + run config; random weights, bf16) for `+experiment=<model>`
   with the default schedule, then `fpsa_train.export` → deploy folder (bf16 safetensors, manifest with sha256),
   once per schedule in `--schedules` (export's `schedule_file`). Export time and size are reported.
2. `load_deploy(device=cuda)`: hash verification + build + load, timed; FPS attention with the exported schedule
   (the Hopper FP8 kernel on H100/H200). The baseline is the same exported weights in a plain WanModel (dense SDPA:
   PyTorch picks cuDNN/Flash), under the same bf16 autocast.
3. One denoising step = one forward of the guidance batch (prompt + negative prompt: 2 samples), as the sampler
   runs it. Median of `--reps` CUDA-event timings after warmup, per regime (σ inside it) and dense; the schedule
   mean weights each regime by its share of Wan's 50 flow-UniPC steps (shift 5). The relative difference of each
   regime's output from dense is printed as a sanity check (the head is re-initialised N(0, 0.02); the published
   init zeroes it, which would make every output 0).

  python scripts/bench_deploy.py --model wan1_3b --latent 21 60 104 --out docs/bench_deploy_h100.json \
      [--schedules configs/fps/default.yaml,configs/fps/sparse.yaml]

`--fp8-linears`: the deploy runtime's large Linears in FP8 (fpsa_train/fp8_linears.py, torchao); the dense model is
then timed a second time with them too (`dense_fp8_linears_ms`: the linears' gain alone, same run). `--compile`:
the deploy runtime under torch.compile (`Deployed.compile`; the baseline stays eager). `--gluon`: the FPS schedules'
regimes in the kernel's warp-specialised Gluon forward (`load_deploy(kernel_forward="gluon")`; Hopper, head dim 128)
instead of its Triton forward. `--sample-steps 50`: also
the whole sampling loop of one video (both guidance branches per step; no text encoding or VAE decoding) per
schedule and with dense SDPA on the same weights, in wall seconds. `--breakdown`: one profiled step of dense and
of each regime, GPU time per component (self-attention, cross-attention, linears, other).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def train_config(model: str, latent: tuple[int, int, int]):
    """The resolved training config of `+experiment=<model>` at this latent size (default schedule)."""
    from hydra import compose, initialize_config_dir

    from fpsa_train.config import resolve

    overrides = [f"+experiment={model}", "model.weights=null", f"data.latent_frames={latent[0]}",
                 f"data.latent_height={latent[1]}", f"data.latent_width={latent[2]}", "run_dir=/tmp/unused"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return resolve(compose(config_name="train", overrides=overrides))


def random_dit(conf, dtype: torch.dtype | None = None):
    """A random-weight WanModel of `conf.model` on the GPU; its head re-initialised N(0, 0.02) (the published init
    zeroes it, which would make every output 0)."""
    from fpsa_train.models.build import architecture_of
    from fpsa_train.models.wan import WanModel

    with torch.device("cuda"):
        net = WanModel(architecture_of(conf.model))
        torch.nn.init.normal_(net.head.head.weight, std=0.02)
    return net if dtype is None else net.to(dtype)


def training_checkpoint(model: str, latent: tuple[int, int, int], path: Path) -> None:
    """A checkpoint shaped as training writes it: `model.*` state dict, run config, global step (random weights)."""
    from fpsa_train.fps.schedule import Schedule
    from fpsa_train.lit.training_checkpoint import RUN_CONFIG_KEY
    from fpsa_train.train import run_config

    conf = train_config(model, latent)
    schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    net = random_dit(conf)
    state = {f"model.{k}": v.to(torch.bfloat16).cpu() for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, RUN_CONFIG_KEY: run_config(conf, schedule), "global_step": 0}, path)


def in_memory_deploy(dense, schedule_file: str, compile: bool, fp8_linears: bool, kernel_forward: str = "triton"):
    """The deploy runtime as `load_deploy` assembles it (`deploy.assemble`) on a copy of `dense`'s random weights,
    without the export and load round trip (`--no-export`)."""
    import copy

    from fpsa_train.deploy import assemble
    from fpsa_train.fps.schedule import FPSConfig, Schedule

    model = copy.deepcopy(dense)
    schedule = Schedule.from_config(FPSConfig(schedule_file=schedule_file), tuple(model.cfg.tile_shape))
    return assemble(model, schedule, {}, Path(f"<in memory: {schedule_file}>"), next(model.parameters()).device,
                    fp8_linears=fp8_linears, compile=compile, kernel_forward=kernel_forward)


def median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


COMPONENTS = ("self-attention", "cross-attention", "linears", "other")
PARTS = COMPONENTS + ("unattributed",)


def component_of(event) -> str | None:
    """The component a profiler op event names (None: not one of them)."""
    if event.name == "fpsa::attention":
        return "self-attention"
    if event.name == "aten::scaled_dot_product_attention":
        q, k = event.input_shapes[0], event.input_shapes[1]
        return "self-attention" if q[-2] == k[-2] else "cross-attention"
    if event.name == "aten::linear":
        return "linears"
    return None


def step_breakdown(fn, cuda: bool) -> dict[str, float]:
    """Milliseconds of one call of `fn` per component, from the profiler: GPU kernel time on CUDA (CPU op time on
    CPU). Self-attention is the FPS op (`fpsa::attention`: pre-pass, selection, plan, kernel) or SDPA with as many
    keys as queries; cross-attention is SDPA over the text's keys; linears are `aten::linear` (with FP8 linears,
    whatever of torchao's quantization runs under it); other is the rest (norms, modulation, RoPE, elementwise work).

    Each unit of time is counted once, by who spends it: on CUDA every kernel belongs to the one op that launched
    it, on CPU every op owns its self time; either goes to the outermost component op above it in the call tree,
    else to "other"; GPU time that no op launched is "unattributed". (Summing the profiler's per-op totals
    instead counts a kernel once as a kernel and again under its op, and an op twice where autocast re-dispatches
    it under its own name: the first H200 run of this split reported 2.5 to 3.5 times the step's time.) `total` is the
    sum of the parts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.no_grad(), profile(activities=activities, record_shapes=True) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return attribute(prof.events(), cuda)


def attribute(events, cuda: bool) -> dict[str, float]:
    """`step_breakdown`'s split of a profile's events (milliseconds per part, and their total)."""
    from torch.autograd import DeviceType

    parts, device_total = dict.fromkeys(COMPONENTS, 0.0), 0.0
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async:
            device_total += e.time_range.elapsed_us() if cuda and e.device_type == DeviceType.CUDA else 0
            continue  # kernels are counted through the op that launched them
        own = sum(k.duration for k in e.kernels) if cuda else e.self_cpu_time_total
        if not own:
            continue
        name, up = "other", e
        while up is not None:
            name = component_of(up) or name
            up = up.cpu_parent
        parts[name] += own / 1e3
    parts["unattributed"] = max(device_total / 1e3 - sum(parts.values()), 0.0)  # GPU work no op claims
    return {**parts, "total": sum(parts.values())}


def sample_seconds(deployed, x: torch.Tensor, text: torch.Tensor, steps: int) -> float:
    """Wall seconds of `steps` sampling steps of one video (x[:1]; text[0] as the prompt, text[1] as the negative),
    after a 2-step warm-up (kernel autotuning and, compiled, the regimes' first graphs outside the timing)."""
    from fpsa_train.sampling import denoise_loop

    texts = [text[0], text[1]]
    with torch.no_grad():
        denoise_loop(deployed, x[:1], texts, 2, 5.0, 5.0, leave=False)
        torch.cuda.synchronize()
        started = time.perf_counter()
        denoise_loop(deployed, x[:1], texts, steps, 5.0, 5.0, leave=False)
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    from fpsa_train.deploy import load_deploy
    from fpsa_train.export import ExportConfig, export
    from fpsa_train.models.checkpoint import load_wan_weights
    from fpsa_train.models.wan import WanModel
    from fpsa_train.sampling import Denoiser, flow_unipc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wan1_3b")
    p.add_argument("--latent", type=int, nargs=3, default=(21, 60, 104), help="latent T H W (480p: 21 60 104)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before the timed ones, after the first (which is untimed too; 14B: 0)")
    p.add_argument("--work", default="/tmp/bench_deploy")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--schedules", default="configs/fps/default.yaml",
                   help="comma-separated schedule files, each exported and timed (named by its stem)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the deploy runtime's DiT (Deployed.compile; the warmup step compiles)")
    p.add_argument("--fp8-linears", action="store_true",
                   help="the deploy runtime's large Linears in FP8 (load_deploy(fp8_linears=True): torchao, per-row "
                        "scales); the dense baseline is also timed with them (dense_fp8_linears_ms)")
    p.add_argument("--gluon", action="store_true",
                   help="run the FPS schedules in the kernel's Gluon forward (load_deploy(kernel_forward='gluon'); "
                        "Hopper, head dim 128) instead of its Triton forward")
    p.add_argument("--breakdown", action="store_true",
                   help="also profile one step of dense and of each regime: GPU time per component (self-attention, "
                        "cross-attention, linears, other; step_breakdown)")
    p.add_argument("--sample-steps", type=int, default=0,
                   help="also time a whole sample of this many steps (flow UniPC, shift 5, guidance 5, one video: "
                        "both guidance branches per step, the sampler's loop without text encoding and decoding) "
                        "with each schedule and with dense SDPA on the same weights")
    p.add_argument("--no-export", action="store_true",
                   help="skip export and load_deploy: random bf16 weights built on the GPU, the runtime assembled "
                        "as load_deploy assembles it (in_memory_deploy). For 14B, whose checkpoint and export "
                        "would write 2 × 27 GB; the step's timing does not depend on where the weights came from")
    args = p.parse_args()
    kernel_forward = "gluon" if args.gluon else "triton"
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t0 = time.perf_counter()
    if args.no_export:
        dense = random_dit(train_config(args.model, tuple(args.latent)), torch.bfloat16).eval()
    else:
        training_checkpoint(args.model, tuple(args.latent), work / "last.ckpt")
        dense = None
    t_ckpt = time.perf_counter() - t0
    results = {"schedules": {}}
    sigmas = flow_unipc(50, 5.0, 1000, torch.device("cpu")).sigmas[:-1]
    for path in (f for f in args.schedules.split(",") if f):
        name = Path(path).stem
        t0 = time.perf_counter()
        if args.no_export:
            report = None
            deployed = in_memory_deploy(dense, str(REPO / path), args.compile, args.fp8_linears, kernel_forward)
        else:
            report = export(ExportConfig(checkpoint=str(work / "last.ckpt"), out=str(work / f"deploy_{name}"),
                                         schedule_file=str(REPO / path)))
            t0 = time.perf_counter()
            deployed = load_deploy(report["out"], device="cuda", compile=args.compile, fp8_linears=args.fp8_linears,
                                   kernel_forward=kernel_forward)
        t_load = time.perf_counter() - t0
        if "dense_ms" not in results:  # the baseline, once: the same weights in a plain WanModel, dense SDPA
            if dense is None:
                with torch.device("meta"):
                    dense = WanModel(deployed.model.cfg)
                load_wan_weights(dense, report["out"], dtype=torch.bfloat16)
                dense = dense.cuda().eval()
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, deployed.model.cfg.in_dim, *args.latent, generator=g).cuda()  # (2, C, T, H, W)
            text = torch.randn(2, 512, deployed.model.cfg.text_dim, generator=g).cuda()
            t = torch.full((2,), 500.0, device="cuda")

            def dense_step():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return dense(x, t, text).float()

            ref = dense_step()
            results["dense_ms"] = median_ms(dense_step, args.reps, args.warmup)
            if args.breakdown:
                results["dense_breakdown_ms"] = step_breakdown(dense_step, cuda=True)
            if args.sample_steps:  # bf16 linears, dense SDPA, eager: before FP8 linears touch the baseline
                results["dense_sample_seconds"] = sample_seconds(Denoiser(dense, None), x, text, args.sample_steps)
            if args.fp8_linears:  # the same dense model with FP8 linears: what the linears alone gain
                from fpsa_train.fp8_linears import apply_fp8_linears

                bf16 = dense  # kept for the next schedules' in-memory copies (--no-export)
                dense = copy.deepcopy(bf16)
                apply_fp8_linears(dense)
                results["dense_fp8_linears_rel_diff"] = ((dense_step() - ref).norm() / ref.norm()).item()
                results["dense_fp8_linears_ms"] = median_ms(dense_step, args.reps, args.warmup)
                dense = bf16
        steps = Counter(deployed.schedule.regime_for(float(s)).name for s in sigmas)
        regimes = {}
        for regime in deployed.schedule.regimes:
            sigma = (regime.lo + regime.hi) / 2
            t_first = time.perf_counter()
            out = deployed.denoise(x, sigma, text, timestep=t)
            torch.cuda.synchronize()
            t_first = time.perf_counter() - t_first  # compiled: this step compiled the regime's graph
            ms = median_ms(lambda: deployed.denoise(x, sigma, text, timestep=t), args.reps, args.warmup)
            regimes[regime.name] = {"sigma": sigma, "ms": ms, "speedup_vs_dense": results["dense_ms"] / ms,
                                    "rel_diff_vs_dense": ((out - ref).norm() / ref.norm()).item(),
                                    "sampling_steps_of_50": steps[regime.name], "first_step_seconds": t_first}
            if args.breakdown:
                regimes[regime.name]["breakdown_ms"] = step_breakdown(
                    lambda: deployed.denoise(x, sigma, text, timestep=t), cuda=True)
        mean_ms = sum(r["ms"] * r["sampling_steps_of_50"] for r in regimes.values()) / 50
        results["schedules"][name] = {
            "file": path, "backend": deployed.backend, "regimes": regimes, "schedule_mean_ms": mean_ms,
            "schedule_mean_speedup_vs_dense": results["dense_ms"] / mean_ms,
            "load_deploy_seconds": round(t_load, 2)}
        if report is not None:
            results["schedules"][name]["export"] = {"seconds": report["seconds"], "bytes": report["bytes"],
                                                    "files": report["files"]}
        if args.sample_steps:
            seconds = sample_seconds(deployed, x, text, args.sample_steps)
            results["schedules"][name].update(sample_seconds=seconds,
                                              sample_speedup_vs_dense=results["dense_sample_seconds"] / seconds)
        deployed = None  # freed before the next schedule's copy is loaded
        torch.cuda.empty_cache()
    results.update({
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
        "latent": list(args.latent), "tokens": args.latent[0] * args.latent[1] * args.latent[2] // 4,
        "checkpoint_write_seconds": round(t_ckpt, 2), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "date": time.strftime("%Y-%m-%d"), "compile": args.compile, "fp8_linears": args.fp8_linears,
        "kernel_forward": kernel_forward,
        "sample_steps": args.sample_steps, "breakdown": args.breakdown, "no_export": args.no_export,
    })
    print(json.dumps(results, indent=1))
    print("\n| schedule | step (CFG batch 2) | ms | vs dense |\n|---|---|---|---|")
    print(f"| — | dense bf16 | {results['dense_ms']:.1f} | 1.00× |")
    if args.fp8_linears:
        print(f"| — | dense, FP8 linears | {results['dense_fp8_linears_ms']:.1f} | "
              f"{results['dense_ms'] / results['dense_fp8_linears_ms']:.2f}× |")
    for name, sched in results["schedules"].items():
        for regime, r in sched["regimes"].items():
            print(f"| {name} | {regime} (σ={r['sigma']:.2f}, {r['sampling_steps_of_50']}/50 steps) | {r['ms']:.1f} | "
                  f"{r['speedup_vs_dense']:.2f}× |")
        print(f"| {name} | mean over 50 steps (shift 5) | {sched['schedule_mean_ms']:.1f} | "
              f"{sched['schedule_mean_speedup_vs_dense']:.2f}× |")
        if args.sample_steps:
            print(f"| {name} | whole {args.sample_steps}-step sample (dense SDPA: "
                  f"{results['dense_sample_seconds']:.1f} s) | {1000 * sched['sample_seconds']:.0f} | "
                  f"{sched['sample_speedup_vs_dense']:.2f}× |")
    if args.breakdown:
        print(f"\n| step | {' | '.join(PARTS)} | profiled total (ms) |\n|---{'|---' * (len(PARTS) + 1)}|")
        rows = [("dense bf16", results["dense_breakdown_ms"])] + [
            (f"{name} {regime}", r["breakdown_ms"]) for name, sched in results["schedules"].items()
            for regime, r in sched["regimes"].items()]
        for label, parts in rows:
            print(f"| {label} | {' | '.join(f'{parts[c]:.1f}' for c in PARTS)} | {parts['total']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
