"""Make the DeepSpeed ZeRO-2 / ZeRO-3 checkpoint fixtures in tests/fixtures/zero/.

They are the test inputs of our ZeRO checkpoint reader. They are made once, here (and checked in),
by real DeepSpeed: `FlowMatchingModule` on a micro Wan DiT (FPS attention on) is trained for 2 steps with
Lightning's DeepSpeed strategy, world size 2 on CPU (gloo), and saved by `trainer.save_checkpoint` exactly as a
DeepSpeed training run saves. Per stage S in {2, 3}:

  zeroS/ckpt/                   the folder Lightning writes (`latest`, `checkpoint/*_states.pt`), minus the
                                zero_to_fp32.py DeepSpeed copies into it (third-party code)
  zeroS/reference.safetensors   the oracle: deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint of
                                that folder, keys as DeepSpeed returns them (`model.<parameter name>`)
  zeroS/ema_reference.safetensors  the module's EMA shadow at save time (rank 0), when EMA is on (ZeRO-2)

ZeRO-3 runs with optim.ema_decay=0 (the fixture predates the partitioned EMA, lit/ema.py, which now trains
under ZeRO-3 and is covered by tests/test_deepspeed_cpu.py); `--zero3-ema` makes it with the EMA on. ZeRO-3
partitions every parameter here (stage3_param_persistence_threshold=0), as it does a real model's; with
DeepSpeed's default it would keep all of the micro model's parameters whole.

Seeded: the safetensors come out byte-identical on every run. One value differs between runs: the padding element
at the end of ZeRO-3 rank 1's `fp32_flat_groups`, which DeepSpeed leaves uninitialised (readers must ignore it).

Regenerate (DeepSpeed is in .venv since scripts/install.sh installs it; ~1-2 min on 2 cores):

  DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python scripts/make_zero_fixtures.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo, no oneCCL
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/dsprobe/torch_ext")  # its shm all-reduce op is built once

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.conftest

import lightning as L  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.conftest import compose_train  # noqa: E402  (first: it picks Triton's CPU interpreter)
from fpsa_train.config import resolve  # noqa: E402
from fpsa_train.fps.schedule import Schedule  # noqa: E402
from fpsa_train.fps.transform import apply_fps_attention  # noqa: E402
from fpsa_train.lit.datamodule import LatentDataModule  # noqa: E402
from fpsa_train.lit.module import FlowMatchingModule  # noqa: E402
from fpsa_train.models.build import build_model  # noqa: E402
from fpsa_train.train import run_config  # noqa: E402

OUT = REPO / "tests" / "fixtures" / "zero"
SEED = 0
# A micro DiT (5.5 k parameters). 3 latent channels and patch 1×1×1 give head.head.bias 3 elements, an odd total:
# the readers' padding paths run (ZeRO-2 pads the flat group, ZeRO-3 each parameter, to the world size).
OVERRIDES = ["+experiment=tiny", "data=synthetic", "fps=default", "fps.regimes.1.quant.factor=[1,2,2]",
             "model.dim=16", "model.ffn_dim=16", "model.num_heads=2", "model.num_layers=1", "model.text_dim=8",
             "model.freq_dim=8", "model.in_dim=3", "model.out_dim=3", "model.patch_size=[1,1,1]",
             "model.tile_shape=[1,2,2]", "data.latent_frames=2", "data.latent_height=4", "data.latent_width=4",
             "data.text_tokens=4", "data.num_samples=8", "data.val_samples=2", "data.batch_size=2",
             "trainer.max_steps=2", "optim.lr=1e-3", "optim.warmup_steps=1", f"seed={SEED}"]


def cpu_deepspeed_strategy(stage: int, micro_batch: int):
    """Our CPU DeepSpeed strategy (fpsa_train/lit/strategy.py: gloo, Lightning's CUDA-only checks bypassed)."""
    from fpsa_train.lit.strategy import CPUDeepSpeedStrategy

    # persistence threshold 0: ZeRO-3 partitions every parameter, however small (its default keeps those under 1e5
    # elements whole on every rank, which is all of the micro model's)
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    config = {"zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "zero_force_ds_cpu_optimizer": False, "train_micro_batch_size_per_gpu": micro_batch}
    return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo")


def make(stage: int, ema: bool) -> None:
    """One rank of the stage-`stage` run (Lightning re-runs this script for rank 1)."""
    import deepspeed
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = OUT / f"zero{stage}"
    conf = resolve(compose_train([*OVERRIDES, f"optim.ema_decay={0.9 if ema else 0}"]))
    L.seed_everything(conf.seed, workers=True)
    model = build_model(conf.model)  # what fpsa_train/train.py:train() builds
    schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    apply_fps_attention(model, schedule, materialize=conf.fps.materialize, backend=conf.fps.backend)
    module = FlowMatchingModule(model, conf.objective, conf.optim, schedule, conf.fps.selector_reg_weight,
                                run_config=run_config(conf, schedule))
    data = LatentDataModule(conf.data, text_len=conf.model.text_len)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=cpu_deepspeed_strategy(stage, conf.data.batch_size),
                        precision="32-true", max_steps=conf.trainer.max_steps, gradient_clip_val=conf.optim.grad_clip,
                        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)

    ckpt = folder / "ckpt"
    trainer.save_checkpoint(ckpt)
    live = {}  # full fp32 parameters, gathered from the ranks under ZeRO-3, to cross-check DeepSpeed's consolidation
    for name, p in trainer.strategy.deepspeed_engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
            live[name] = p.detach().float().clone()
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="checkpoint")
        ref = {k: v.contiguous() for k, v in ref.items()}
        assert ref.keys() == live.keys() and all(torch.equal(ref[k], live[k]) for k in ref), "oracle != live"
        save_file(ref, folder / "reference.safetensors")
        if module.ema is not None:
            ema_state = {k: v.contiguous() for k, v in module.ema.state_dict().items()}
            save_file(ema_state, folder / "ema_reference.safetensors")
    trainer.strategy.barrier()


def verify(stage: int) -> None:
    """Every model_states file loads with weights_only=True; the oracle holds every parameter of the micro model."""
    folder = OUT / f"zero{stage}"
    states = sorted((folder / "ckpt" / "checkpoint").glob("*model_states.pt"))
    assert states, f"no model_states in {folder}"
    for f in states:
        client = torch.load(f, weights_only=True, map_location="cpu")
        print(f"{f.relative_to(REPO)}: keys {sorted(client)}")
    params = {n: tuple(p.shape) for n, p in build_model(resolve(compose_train(OVERRIDES)).model).named_parameters()}
    ref = load_file(folder / "reference.safetensors")
    got = {k: tuple(v.shape) for k, v in ref.items()}
    want = {f"model.{n}": s for n, s in params.items()}
    assert got == want, f"zero{stage}: reference keys/shapes differ: {sorted(got.items() ^ want.items())[:10]}"
    print(f"zero{stage}: reference.safetensors has all {len(ref)} parameters (keys 'model.<name>')")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=int, choices=[2, 3], help="internal: run one stage in this process")
    ap.add_argument("--zero3-ema", action="store_true", help="keep EMA on under ZeRO-3 (fails; see docstring)")
    args = ap.parse_args()
    if args.stage is not None:
        make(args.stage, ema=args.stage == 2 or args.zero3_ema)
        return
    for stage in (2, 3):  # each stage in a fresh process group; Lightning spawns rank 1 itself
        shutil.rmtree(OUT / f"zero{stage}", ignore_errors=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
        cmd = [sys.executable, __file__, "--stage", str(stage)] + ["--zero3-ema"] * args.zero3_ema
        subprocess.run(cmd, env=env, check=True, cwd=REPO)
        verify(stage)


if __name__ == "__main__":
    main()
