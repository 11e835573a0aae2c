"""Run every command of README.md's ```bash and ```python blocks on CPU with tiny inputs (`make docs-check`, which
CI runs after `make test`), and print a table of the commands and their results.

How a command gets from the README to a run:
1. Extracted, never copied: each logical line of a ```bash block (continuations joined, comments dropped; an
   `export` line goes with the command after it) and each ```python block is one command. Every command must match
   a RULE or be in NOT_RUN with its reason; a command that matches neither fails, and so does a rule or reason that
   matches no command (so the lists cannot go stale).
2. Run in order, in a scratch folder laid out like the checkout's root (LINKED: .venv, Makefile, scripts/, ...), so
   its relative paths work as written and what it writes (outputs/, deploy/, .fpsa_data/) stays out of the
   checkout. A command whose input a later command makes (the calibrated schedule) runs after the rest.
3. With the few substitutions CI needs, all in SUBSTITUTIONS: paths that only exist on a training machine point to
   tiny fixtures in the same layout (build_data), a placeholder run to a real one. A rule may add its own (the
   torchrun launch: loopback addresses, one process per node); `torchrun` is the venv's (its bin/ leads PATH).
   DeepSpeed builds its CPU op into the scratch folder (TORCH_EXTENSIONS_DIR), not into ~/.cache.
4. With tiny sizes appended (Hydra and argparse take the last value given): 2 training steps; for the embedded
   default 12 small clips and an untrained tiny VAE; Wan-shaped models at 2 blocks of width 128 (the fixtures'
   shape); 2 sampling steps at 64x64x5; 2 calibration σ.
5. Checked: exit status 0, and every output the README promises (a checkpoint, a cache index, a deploy folder, an
   mp4 and its PNG, a calibrated schedule, a printed table) is there, written after the command started.
It takes about 6 minutes on 2 CPU cores; the slowest commands are the two DeepSpeed launches (`+experiment=wan14b`
and the two-node torchrun; each JIT-builds DeepSpeed's CPU communication op, 40-60 s) and `make demo` (it builds
the tiny data the other tiny commands reuse).

Why a script and not a pytest module: the commands are one chain (train, then export, then sample; calibrate, then
train with its schedule) sharing one folder, and the result is one table. tests/test_readme.py checks in
`make test`, without running anything, that every README command has a rule or a reason.

Usage: python scripts/docs_check.py [--list] [--work DIR] [--keep]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = (".venv", "Makefile", "pyproject.toml", "constraints.txt", "scripts", "configs", "assets")
"""What the commands use relative to the checkout's root: linked into the scratch folder."""

# ---------------------------------------------------------------------------------------------------- substitutions
SUBSTITUTIONS = (
    # Weights, clips and the cache folder of a training machine: build_data makes each /data path the README names
    # in the same layout (original or diffusers Wan folders, a metadata CSV with its mp4s), at toy size.
    (r"(?<![\w./])/data/", "{work}/data/"),
    # The shared file system of the two-node launch.
    (r"(?<![\w./])/shared/", "{work}/shared/"),
    # The default tiny run keeps its checkpoints of steps 200 and 300; the 2-step run here keeps those of steps 1, 2.
    (r"outputs/tiny/checkpoints/step0000200\.ckpt", "outputs/tiny/checkpoints/step0000001.ckpt"),
    # The calibration's run folder is named by its start time: the newest one (a glob, resolved when the command
    # runs; the command waits for the calibration if it comes first in the README).
    (r"outputs/calibrate/<run>/", "outputs/calibrate/*/"),
)

# ------------------------------------------------------------------------------------------------------ tiny sizes
TINY_STEPS = ("trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "trainer.log_every_n_steps=1")
# The embedded default's data (data=tiny_videos, encoded by the shipped assets/world_components): 12 generated clips
# instead of 48, clips of 9 frames at 64x128 (96 tokens in 4 tiles) instead of 17 at 128x128 (320 tokens).
# Every tiny command uses the same values, so the data is built once (by `make demo`) and reused.
TINY_DATA = ("data.generate_clips=12", "data.val_samples=4", "data.num_frames=9", "data.buckets=[[64,128]]")
# Wan's code path at toy size: 2 blocks of width 128 (2 heads of 64), the tiny UMT5's text width, 2x2x2-token tiles
# (so the default schedule's top-4 regime has 4 tiles to pick from). build_data writes weights of this shape.
WAN_MODEL = ("model.dim=128", "model.num_heads=2", "model.ffn_dim=256", "model.num_layers=2", "model.text_dim=64",
             "model.tile_shape=[2,2,2]")
# 2x8x8 latents either way: synthetic, or encoded from 5 frames of 64x64 pixels (data=videos).
WAN_DATA = ("data.latent_frames=2", "data.latent_height=8", "data.latent_width=8", "data.num_samples=8",
            "data.val_samples=2", "data.num_frames=5", "data.buckets=[[64,64]]")
TRAIN_OUTPUTS = ("{run}/checkpoints/last.ckpt", "{run}/logs/metrics.csv")

# ------------------------------------------------------------------------------------------------------------ rules


@dataclass(frozen=True)
class Rule:
    """How to run the README commands that `pattern` finds (re.search; the first rule that finds one wins)."""
    pattern: str
    append: tuple[str, ...] = ()
    """Tiny sizes appended to the command (bash: shell-quoted arguments; python: lines after the block)."""
    expect: tuple[str, ...] = ()
    """Outputs the README promises: globs in the scratch folder; {run}, {out} are the command's run dir and out=."""
    prints: str = ""
    """A regex its output must contain (what the README says it prints)."""
    replace: tuple[tuple[str, str], ...] = ()
    """This rule's own substitutions; {node} and {port} are filled in per launch."""
    nodes: int = 1
    """Launch the command this many times at once, node ranks 0..nodes-1, as on that many machines."""
    prelude: str = ""
    """python: what the block assumes is already defined."""
    env: tuple[tuple[str, str], ...] = ()


KERNEL_INPUTS = """\
import torch
from omegaconf import OmegaConf
from fpsa_train.fps.schedule import FPSConfig, Schedule
from fpsa_train.models.token_order import TokenLayout
layout = TokenLayout((2, 8, 8), "tile", (2, 4, 4))  # a 2x8x8 token grid in 2x4x4 tiles, tile-major
fps = OmegaConf.merge(OmegaConf.structured(FPSConfig), OmegaConf.load("configs/fps/default.yaml"))
regime = Schedule.from_config(fps, (2, 4, 4)).regime_for(0.2)  # `late`: per-tile FP8, window + top-4
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, layout.seq_len, 64, generator=g).bfloat16().requires_grad_() for _ in range(3))
dout = torch.randn(1, 2, layout.seq_len, 64, generator=g).bfloat16()
"""

RULES = (
    Rule(r"^make demo\b",  # the Makefile appends these to its training and sampling commands
         append=("DEMO_TRAIN_ARGS=" + shlex.join(TINY_STEPS + TINY_DATA), "DEMO_SAMPLE_ARGS=steps=2",
                 "DEMO_EVAL_ARGS=steps=2", "DEMO_SEEDS=[0]"),
         expect=("outputs/demo/train/checkpoints/last.ckpt", "outputs/demo/deploy/manifest.json",
                 "outputs/demo/samples/demo.mp4", "outputs/demo/samples/demo.png",
                 "outputs/demo/eval/results.md"),
         prints=r"video: outputs/demo/samples/demo\.mp4\ncontact sheet: outputs/demo/samples/demo\.png"),
    # Two nodes on loopback, one CPU process each (gloo), as the README's launch is run on each node.
    Rule(r"\btorchrun ", nodes=2,
         replace=(("node0.example", "127.0.0.1"), ("MASTER_PORT=29500", "MASTER_PORT={port}"),
                  ("NODE_RANK=0", "NODE_RANK={node}"), ("--nproc-per-node 8", "--nproc-per-node 1")),
         append=("trainer.devices=1", *TINY_STEPS, *WAN_MODEL, *WAN_DATA), expect=TRAIN_OUTPUTS),
    Rule(r"-m fpsa_train\.preprocess ", append=("num_frames=5", "buckets=[[64,64]]"),
         expect=("{out}/index.json", "{out}/report.json")),
    Rule(r"-m fpsa_train\.calibrate ",
         append=("sigmas=[0.25,0.75]", "samples=1", "data.latent_frames=3", "data.latent_height=8",
                 "data.latent_width=8"),
         expect=("outputs/calibrate/*/calibrated_schedule.yaml",)),
    Rule(r"scripts/fps_sqnr\.py ", append=("--grid", "6", "16", "16", "--overrides", "+experiment=tiny", *TINY_DATA),
         prints=r"q/k/v of outputs/tiny/checkpoints/last\.ckpt .*\n\| regime \| σ \| density \|"),
    Rule(r"-m fpsa_train\.export ", expect=("{out}/manifest.json", "{out}/diffusion_pytorch_model.safetensors")),
    Rule(r"-m fpsa_train\.sample ", append=("steps=2", "height=64", "width=64", "frames=5"),
         expect=("{out}/*.mp4", "{out}/*.png")),
    # One held-out prompt, one seed, 2 steps at 64x64x5 (the tiny deploy folder exported above).
    Rule(r"-m fpsa_train\.evaluate ", append=("max_prompts=1", "seeds=[1000]", "steps=2", "height=64", "width=64",
                                              "frames=5"),
         expect=("outputs/eval/results.md", "outputs/eval/results.json", "outputs/eval/contact_sheet.png",
                 "outputs/eval/plot.png")),
    Rule(r"-m fpsa_train \+experiment=tiny\b", append=(*TINY_STEPS, *TINY_DATA), expect=TRAIN_OUTPUTS),
    Rule(r"-m fpsa_train \+experiment=wan", append=(*TINY_STEPS, *WAN_MODEL, *WAN_DATA), expect=TRAIN_OUTPUTS),
    # No Hopper GPU on CI: the kernels run in Triton's CPU interpreter.
    Rule(r"fps_attention\(q, k, v, layout, regime\)", prelude=KERNEL_INPUTS, env=(("TRITON_INTERPRET", "1"),),
         append=("assert q.grad is not None and out.shape == q.shape and lse.shape == q.shape[:3]",)),
    Rule(r"WanPipeline\.from_pretrained\(", append=("assert pipe.transformer is transformer",)),
)

NOT_RUN = {
    r"^make test$": "CI runs it itself: .ci/run runs `make test`, then `make docs-check`",
}
PROSE = {  # commands the README gives inline, in a sentence rather than a block
    "srun python -m fpsa_train ...": "needs a Slurm allocation (srun starts the ranks); its arguments are the "
                                     "torchrun launch's, which runs here",
}

# ------------------------------------------------------------------------------------------------------ extraction


@dataclass
class Command:
    line: int
    """Line in README.md where the command starts."""
    lang: str
    """bash or python."""
    text: str
    """The command as the README writes it (bash: continuations joined; an `export` line first, then `; `)."""
    rule: Rule | None = None
    reason: str | None = None
    """Why it is not run (NOT_RUN, PROSE)."""


def _strip_comment(line: str) -> str:
    """`line` without a shell comment (an unquoted # at the start of a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def extract(readme: str) -> list[Command]:
    """The commands of `readme`'s ```bash and ```python blocks, in order."""
    commands, lang, start, body = [], None, 0, []
    for number, line in enumerate(readme.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number + 1, []
        elif fence:
            if lang == "python":
                commands.append(Command(start, "python", "\n".join(body).strip() + "\n"))
            elif lang == "bash":
                commands += _bash_commands(body, start)
            lang = None
        elif lang is not None:
            body.append(line)
    return commands


def _bash_commands(lines: list[str], first: int) -> list[Command]:
    commands, exports, current, at = [], [], [], first
    for number, raw in enumerate(lines, first):
        line = _strip_comment(raw)
        if not line.strip():
            continue
        at = at if current else number
        current.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        text, current = " ".join(current), []
        if text.startswith("export "):  # sets the environment of the command after it
            exports.append((at, text))
        else:
            line = exports[0][0] if exports else at
            commands.append(Command(line, "bash", "; ".join([t for _, t in exports] + [text])))
            exports = []
    return commands


def plan(readme: str) -> tuple[list[Command], list[str]]:
    """Every README command with its rule or its reason not to run, and the problems: commands with neither,
    rules and reasons that match no command."""
    commands, problems, used = extract(readme), [], set()
    for cmd in commands:
        cmd.rule = next((r for r in RULES if re.search(r.pattern, cmd.text, re.M)), None)
        reasons = [pattern for pattern in NOT_RUN if re.search(pattern, cmd.text)]
        cmd.reason = NOT_RUN[reasons[0]] if reasons else None
        used.update([cmd.rule, *reasons])
        if cmd.rule and cmd.reason:
            problems.append(f"README.md:{cmd.line}: both a rule ({cmd.rule.pattern}) and a reason not to run it")
        elif not cmd.rule and not cmd.reason:
            problems.append(f"README.md:{cmd.line}: no rule runs `{_short(cmd.text)}` and NOT_RUN gives no reason: "
                            f"add one to scripts/docs_check.py")
    problems += [f"rule {r.pattern!r} matches no README command" for r in RULES if r not in used]
    problems += [f"NOT_RUN {p!r} matches no README command" for p in NOT_RUN if p not in used]
    lines = readme.splitlines()
    for text, why in PROSE.items():
        line = next((i for i, ln in enumerate(lines, 1) if f"`{text}`" in ln), 0)
        if not line:
            problems.append(f"PROSE: `{text}` is no longer in README.md: remove it here")
        commands.append(Command(line, "prose", text, reason=why))
    return commands, problems


def _short(text: str, width: int = 96) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."

# -------------------------------------------------------------------------------------------------------- fixtures


def build_data(data: Path) -> None:
    """The /data of a training machine, at toy size, in the layouts the README names: original Wan folders (one
    bf16 safetensors: loading casts; 14B's sharded with its index, as published), diffusers pipeline folders
    (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/) and captioned clips."""
    import torch
    from diffusers import UniPCMultistepScheduler

    from fpsa_train.data.synthetic_video import generate_clips
    from fpsa_train.data.tiny_models import build_tiny_wan_components
    from fpsa_train.models.checkpoint import save_wan_weights
    from fpsa_train.models.config import WanConfig
    from fpsa_train.models.wan import WanModel

    arch = {key.removeprefix("model."): json.loads(value) for key, value in (o.split("=") for o in WAN_MODEL)}
    torch.manual_seed(0)
    model = WanModel(WanConfig(**arch))
    save_wan_weights(model, data / "Wan2.1-T2V-1.3B", "original", dtype=torch.bfloat16)
    save_wan_weights(model, data / "Wan2.1-T2V-14B", "original", max_shard_bytes=2**20)
    for name in ("Wan2.1-T2V-1.3B-Diffusers", "Wan2.1-T2V-14B-Diffusers"):
        folder = data / name
        build_tiny_wan_components(folder, None, seed=0)  # untrained VAE, random UMT5 (width 64), tokenizer
        save_wan_weights(model, folder / "transformer", "diffusers")
        UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                flow_shift=5.0).save_pretrained(folder / "scheduler")
        index = json.loads((folder / "model_index.json").read_text())
        index.update(transformer=["diffusers", "WanTransformer3DModel"], scheduler=["diffusers",
                                                                                     "UniPCMultistepScheduler"])
        (folder / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
    generate_clips(data / "clips", 12, seed=0)  # clips/metadata.csv and clips/clips/*.mp4

# --------------------------------------------------------------------------------------------------------- running


class NotYet(Exception):
    """The command's input is made by a later command."""


def _args(text: str) -> dict[str, str]:
    """key=value arguments of a command (the last one of a key wins)."""
    return dict(tok.split("=", 1) for tok in shlex.split(text) if "=" in tok and not tok.startswith("-"))


def _substitute(text: str, work: Path) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        replacement = replacement.format(work=work)
        if "*" in replacement and re.search(pattern, text):
            found = sorted(glob.glob(str(work / replacement)), key=os.path.getmtime)
            if not found:
                raise NotYet(f"nothing matches {replacement}")
            replacement = os.path.relpath(found[-1], work) + "/"
        text = re.sub(pattern, lambda _: replacement, text)
    return text


def _outputs(cmd: Command, final: str) -> list[str]:
    args = _args(final)
    run = args.get("hydra.run.dir") or f"outputs/{args.get('name') or args.get('+experiment')}"
    return [p.format(run=run, out=args.get("out", "outputs/samples")) for p in cmd.rule.expect]


def run(cmd: Command, work: Path, log: Path, timeout: float = 600) -> tuple[bool, str]:
    """Run one command in `work`; (passed, note)."""
    rule = cmd.rule
    env = {k: v for k, v in os.environ.items() if k not in (
        "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "WORLD_SIZE",
        "LOCAL_RANK")}
    # DeepSpeed JIT-builds its CPU op with the paths of the Python that runs it (through the scratch folder's .venv
    # link for `.venv/bin/python`, the checkout's for torchrun's workers): build into the scratch folder, so that the
    # build the test suite keeps in ~/.cache is not replaced under it.
    env.update(PATH=f"{work / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               TORCH_EXTENSIONS_DIR=str(work / ".torch_extensions"), **dict(rule.env))
    text = _substitute(cmd.text, work)
    if cmd.lang == "python":
        final = rule.prelude + text + "".join(line + "\n" for line in rule.append)
        argvs = [[str(work / ".venv" / "bin" / "python"), "-c", final]]
    else:
        final = " ".join([text, *map(shlex.quote, rule.append)])
        port = _free_port()
        argvs = []
        for node in range(rule.nodes):
            launch = final
            for old, new in rule.replace:
                launch = launch.replace(old, new.format(node=node, port=port))
            argvs.append(["bash", "-c", launch])
    started = time.time()
    with open(log, "w") as out:
        out.write("".join(f"$ {shlex.join(a)}\n" for a in argvs) + "\n")
        out.flush()
        procs = [subprocess.Popen(a, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True) for a in argvs]
        codes = [_wait(p, started + timeout) for p in procs]
    if any(codes):
        return False, f"exit status {codes if len(codes) > 1 else codes[0]}"
    if rule.prints and not re.search(rule.prints, log.read_text(errors="replace")):
        return False, f"its output lacks /{rule.prints}/"
    missing = [p for p in (_outputs(cmd, final) if cmd.lang == "bash" else [])
               if not any(os.path.getmtime(f) >= started - 1 for f in glob.glob(str(work / p)))]
    return (False, "not written: " + ", ".join(missing)) if missing else (True, "")


def _wait(proc: subprocess.Popen, deadline: float) -> int:
    try:
        return proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # its own session: the launcher and everything it started
        proc.wait()
        return 124


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch(work: Path) -> None:
    """`work` laid out like the checkout's root, with the fixtures under data/."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    if "install.sh" in subprocess.run(["make", "-n", "demo"], cwd=REPO, env=env, capture_output=True, text=True).stdout:
        raise SystemExit("the venv is older than what it was installed from: `make install` first (`make docs-check` "
                         "does), or `make demo` would reinstall it from the scratch folder")
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty: the commands must start from a fresh folder")
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    build_data(work / "data")

# ------------------------------------------------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="print each README command and how it is run; run nothing")
    ap.add_argument("--work", type=Path, help="scratch folder (new or empty; kept); default: a temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    args = ap.parse_args()

    commands, problems = plan(README.read_text())
    if args.list:
        for cmd in commands:
            how = cmd.reason or " ".join(cmd.rule.append)
            print(f"README.md:{cmd.line}  {_short(cmd.text)}\n    {'not run: ' if cmd.reason else '+ '}{how}")
        print("\n".join(problems))
        return 1 if problems else 0

    work = (args.work or Path(tempfile.mkdtemp(prefix="fpsa-docs-check-"))).resolve()
    started = time.time()
    scratch(work)
    (work / "logs").mkdir()
    print(f"scratch folder {work} (fixtures in {time.time() - started:.0f} s); logs in {work / 'logs'}", flush=True)
    results: dict[int, tuple[str, str, float]] = {}
    pending = [c for c in commands if c.rule]
    total = len(pending)
    for last_try in (False, True):  # the second pass runs the commands that waited for a later one's output
        waiting = []
        for cmd in pending:
            index = commands.index(cmd)
            log, t0 = work / "logs" / f"{index:02d}-line{cmd.line}.log", time.time()
            try:
                passed, note = run(cmd, work, log)
            except NotYet as why:
                if not last_try:
                    waiting.append(cmd)
                    continue
                passed, note = False, f"its input is missing: {why}"
            results[index] = ("PASS" if passed else "FAIL", note, time.time() - t0)
            print(f"[{len(results)}/{total}] README.md:{cmd.line} {results[index][0]} ({results[index][2]:.0f} s) "
                  f"{_short(cmd.text, 70)}", flush=True)
            if not passed:
                print(f"    {note}; log {log}:\n{_tail(log)}", flush=True)
        pending = waiting

    width = max(len(_short(c.text, 100)) for c in commands)
    print(f"\n{'README':<9} {'command':<{width}}  {'result':<7} {'s':>5}  note")
    for index, cmd in enumerate(commands):
        status, note, seconds = results.get(index, ("not run", cmd.reason or "", 0.0))
        where = f"{cmd.line}" if cmd.lang != "prose" else f"{cmd.line} (text)"
        print(f"{where:<9} {_short(cmd.text, 100):<{width}}  {status:<7} {seconds:>5.0f}  {note}")
    failed = [r for r in results.values() if r[0] != "PASS"] + problems
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"\n{sum(r[0] == 'PASS' for r in results.values())} passed, {len(failed)} failed, "
          f"{sum(c.reason is not None for c in commands)} not run (reasons above); {time.time() - started:.0f} s")
    if not failed and not args.work and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _tail(log: Path, lines: int = 25) -> str:
    text = log.read_text(errors="replace").replace("\r", "\n") if log.exists() else ""
    return "\n".join("    | " + ln for ln in [ln for ln in text.splitlines() if ln.strip()][-lines:])


if __name__ == "__main__":
    sys.exit(main())
