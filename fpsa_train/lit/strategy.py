"""The Lightning strategy for `trainer.strategy` (auto, ddp, deepspeed) and the DeepSpeed config it runs with.

DeepSpeed ZeRO shards the optimizer state and gradients (stage 2) and also the parameters (stage 3) over the
ranks; `offload_optimizer` / `offload_params` move them to CPU memory. Our DeepSpeed strategy changes Lightning's
in two ways:
- Checkpoints (a folder per checkpoint: every rank writes its shard) are written into a hidden sibling folder
  (named by global rank 0, fpsa_train/atomic.py `temp_sibling`) and swapped into place by global rank 0 once every
  rank has finished (`replace_dir`), so a run killed while saving never leaves a half-written `stepNNNNNNN.ckpt`
  (the run directory must be on a file system that all nodes share, as DeepSpeed itself assumes).
- On CPU (tests, the 2-core CI machine) it works around the three places where Lightning's strategy assumes
  CUDA: its environment check, the device-index check, and the device rank it passes to `deepspeed.initialize`.
  Ranks talk over gloo there.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from fpsa_train.atomic import replace_dir, temp_sibling
from fpsa_train.lit.config import TrainerConfig


def deepspeed_config(cfg: TrainerConfig, micro_batch: int) -> dict:
    """The DeepSpeed JSON config for `cfg.deepspeed` (precision, gradient clipping and accumulation are filled in
    by Lightning from the Trainer)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": ds.bucket_size}
    if ds.stage == 2:
        zero["allgather_bucket_size"] = ds.bucket_size
    else:
        zero["stage3_prefetch_bucket_size"] = ds.bucket_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": micro_batch,
            # our optimizer is torch's AdamW (DeepSpeedCPUAdam with offload on GPUs); ZeRO works with both
            "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


class FPSDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with atomic checkpoint folders (see the module docstring)."""

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        final = Path(os.path.abspath(self.broadcast(os.fspath(filepath))))
        tmp = Path(self.broadcast(os.fspath(temp_sibling(final, "tmp"))))  # rank 0's name: every rank writes there
        if self.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
        self.barrier("fpsa_ckpt_start")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("fpsa_ckpt_written")
        if self.is_global_zero:
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's converter (it unpickles fully)
                (tmp / script).unlink(missing_ok=True)
            replace_dir(tmp, final)
        self.barrier("fpsa_ckpt_renamed")


class CPUDeepSpeedStrategy(FPSDeepSpeedStrategy):
    """DeepSpeed on CPU ranks over gloo (DS_ACCELERATOR=cpu): tests and the CI machine."""

    def setup_environment(self) -> None:  # skips "DeepSpeed strategy is only supported on CUDA GPUs"
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:  # skips _validate_device_index_selection (a CPU device has no index)
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed  # upstream passes device_rank=root_device.index, which is None on CPU

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer


def build_strategy(cfg: TrainerConfig, on_cpu: bool, micro_batch: int):
    """`cfg.strategy` as a Lightning strategy (or "auto": Lightning's choice, DDP when there are several devices)."""
    if cfg.strategy == "ddp":
        return DDPStrategy(process_group_backend="gloo" if on_cpu else None)
    if cfg.strategy == "deepspeed":
        if on_cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ImportError(f"trainer.strategy=deepspeed needs DeepSpeed ({err}): `pip install deepspeed` (on "
                              "CPU-only hosts: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)") from err
        if on_cpu:
            return CPUDeepSpeedStrategy(config=deepspeed_config(cfg, micro_batch), process_group_backend="gloo")
        return FPSDeepSpeedStrategy(config=deepspeed_config(cfg, micro_batch))
    return "auto"
