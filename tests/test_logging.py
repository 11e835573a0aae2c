"""Loggers (CSV, TensorBoard, W&B offline) and the TrainingMonitor's metrics in a short real fit on CPU."""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from fpsa_train.config import LoggerConfig, resolve
from fpsa_train.fps.schedule import Schedule
from fpsa_train.fps.transform import apply_fps_attention, fps_cores
from fpsa_train.lit import loggers as loggers_mod
from fpsa_train.lit.loggers import ResumableCSVLogger
from fpsa_train.lit.datamodule import LatentDataModule
from fpsa_train.lit.loggers import build_loggers, wandb_mode
from fpsa_train.lit.module import FlowMatchingModule
from fpsa_train.lit.monitor import TrainingMonitor, latent_tokens
from fpsa_train.models.build import build_model
from tests.conftest import compose_train

TINY = ["+experiment=tiny", "data=synthetic", "data.num_samples=32", "data.val_samples=4", "data.batch_size=2",
        "data.latent_frames=3", "data.latent_height=8", "data.latent_width=8", "model.text_len=32", "seed=1"]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B quiet, offline unless told otherwise, and with its per-user folders inside the test's tmp dir."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    yield
    import wandb

    wandb.finish()


def test_build_loggers_writes_csv_tensorboard_and_offline_wandb_under_run_dir(tmp_path, offline_wandb):
    import wandb

    run_dir = tmp_path / "run"
    loggers = build_loggers(LoggerConfig(), str(run_dir), "tiny")
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger, TensorBoardLogger, WandbLogger]
    for lg in loggers:
        lg.log_metrics({"train/loss": 1.5}, step=0)
        lg.save()
    run_id = loggers[2].experiment.id
    assert loggers[2].experiment.settings.mode == "offline"
    wandb.finish()

    assert (run_dir / "logs" / "metrics.csv").read_text().startswith("step,train/loss")
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run_id
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))) == 1

    again = build_loggers(LoggerConfig(csv=False, tensorboard=False), str(run_dir), "tiny")  # a resumed run
    assert again[0].experiment.id == run_id
    wandb.finish()
    # wandb names offline folders by the second they started: two runs in one second share one
    assert 1 <= len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) <= 2  # `wandb sync` joins them

    other = build_loggers(LoggerConfig(csv=False, tensorboard=False), str(tmp_path / "other"), "tiny")
    assert other[0].experiment.id != run_id


def test_wandb_mode_and_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(LoggerConfig()) == "offline"
    assert wandb_mode(LoggerConfig(wandb_project="p")) == "offline"  # online needs the entity too
    assert wandb_mode(LoggerConfig(wandb_project="p", wandb_entity="e")) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(LoggerConfig(wandb_project="p", wandb_entity="e")) == "disabled"
    assert wandb_mode(LoggerConfig(wandb_mode="offline")) == "offline"  # an explicit mode wins over the env
    loggers = build_loggers(LoggerConfig(wandb_mode="disabled"), str(tmp_path), "tiny")
    assert [type(lg) for lg in loggers] == [ResumableCSVLogger, TensorBoardLogger]
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("package, key", [("wandb", "logger.wandb"), ("tensorboard", "logger.tensorboard")])
def test_missing_logger_package_is_named(tmp_path, monkeypatch, package, key):
    real = importlib.util.find_spec
    monkeypatch.setattr(loggers_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name in (package, "tensorboardX") else real(name, *a))
    with pytest.raises(ImportError, match=f"{key}=true needs the `{package}` package: pip install {package}"):
        build_loggers(LoggerConfig(wandb_mode="offline"), str(tmp_path), "tiny")


# --------------------------------------------------------------------------------------- the monitor in a fit


def fake_fp8_stats(core, calls: list) -> None:
    """Give a core the `collect_stats` switch and `last_fp8_stats` (FPSAttention's, stubbed here): saturation
    0.01·(layer+1) and underflow 0.1 when collecting; record each forward's switch."""
    core.collect_stats = False
    forward = core.forward

    def stats_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        core.last_fp8_stats = {"saturated": 0.01 * (core.layer + 1), "underflow": 0.1} if core.collect_stats else {}
        calls.append((core.layer, core.collect_stats))
        return out

    core.forward = stats_forward


class _Stall(Callback):
    """Stalls for `seconds` of the monitor's (fake) clock after two optimizer steps: after `paused_step` it tells
    the monitor first, after `counted_step` it does not."""

    def __init__(self, monitor: TrainingMonitor, seconds: float, paused_step: int, counted_step: int):
        self.monitor, self.seconds, self.paused_step, self.counted_step = monitor, seconds, paused_step, counted_step
        self.offset = 0.0
        self.done: set[int] = set()
        monitor.clock = lambda: time.perf_counter() + self.offset

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in (self.paused_step, self.counted_step) and step not in self.done:
            self.done.add(step)
            if step == self.paused_step:
                self.monitor.pause(pl_module)
            self.offset += self.seconds


def tiny_fit_parts(tmp_path, overrides=()):
    conf = resolve(compose_train([*TINY, *overrides], tmp_path))
    L.seed_everything(conf.seed)
    model = build_model(conf.model)
    schedule = Schedule.from_config(conf.fps, tuple(conf.model.tile_shape))
    apply_fps_attention(model, schedule)
    module = FlowMatchingModule(model, conf.objective, conf.optim, schedule)
    return conf, module, LatentDataModule(conf.data, text_len=conf.model.text_len)


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_monitor_logs_throughput_density_and_fp8_on_logging_steps(tmp_path):
    conf, module, data = tiny_fit_parts(tmp_path)
    calls: list = []
    for core in fps_cores(module.model):
        fake_fp8_stats(core, calls)
    monitor = TrainingMonitor(log_every_n_steps=2, per_layer=True)
    stall = _Stall(monitor, seconds=1000.0, paused_step=1, counted_step=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=2, accumulate_grad_batches=2,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, stall],
                        logger=CSVLogger(tmp_path, name="logs", version=""))
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - started

    rows = [r for r in read_csv(tmp_path / "logs" / "metrics.csv") if "train/step_time_s" in r]
    assert [r["step"] for r in rows] == [1, 3]  # optimizer steps 2 and 4, at Lightning's own step index
    batch, tokens = conf.data.batch_size, latent_tokens((2, 16, 3, 8, 8), conf.model.patch_size)
    assert tokens == 3 * 4 * 4
    for r in rows:
        per_step = 2 * batch  # two micro-batches per optimizer step
        assert math.isclose(r["train/tokens_per_s"] * r["train/step_time_s"], per_step * tokens, rel_tol=1e-6)
        assert r["train/tokens_per_s_per_gpu"] == r["train/tokens_per_s"]  # one device
        assert math.isclose(r["train/samples_per_s"] * r["train/step_time_s"], per_step, rel_tol=1e-6)
        assert not any(k.startswith("gpu/") for k in r)  # CPU: no memory metrics
        densities = {k: v for k, v in r.items() if k.startswith("density/")}
        assert any(k.endswith("/layer00") for k in densities) and any(k.endswith("/layer01") for k in densities)
        assert all(0 < v <= 1 for v in densities.values()), densities
        assert math.isclose(r["fp8/saturated/layer00"], 0.01) and math.isclose(r["fp8/saturated/layer01"], 0.02)
        assert math.isclose(r["fp8/saturated"], 0.015) and math.isclose(r["fp8/underflow"], 0.1)
    # the stall after step 1 was announced (pause) and is left out; the one after step 3 counts, over 2 steps
    assert 0 < rows[0]["train/step_time_s"] < wall / 2, rows
    assert 500 < rows[1]["train/step_time_s"] < 500 + wall / 2, rows

    # collect_stats was on exactly for the two micro-batches of each logged step (2 and 4), then off again
    assert [on for layer, on in calls if layer == 0] == [False, False, True, True] * 2
    assert not any(core.collect_stats for core in fps_cores(module.model))


def test_monitor_per_layer_off_logs_means_of_the_real_fp8_statistics(tmp_path):
    _, module, data = tiny_fit_parts(tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, log_every_n_steps=1, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TrainingMonitor(1, per_layer=False)],
                        logger=CSVLogger(tmp_path, name="logs", version=""))
    trainer.fit(module, datamodule=data)
    rows = [r for r in read_csv(tmp_path / "logs" / "metrics.csv") if "train/tokens_per_s" in r]
    assert len(rows) == 2 and not [k for r in rows for k in r if "/layer" in k]
    for r in rows:
        assert all(0 < v <= 1 for k, v in r.items() if k.startswith("density/"))
        # FPSAttention's own statistics; a step whose samples all fell in unquantized regimes has none
        assert all(0 <= r[k] <= 1 for k in ("fp8/saturated", "fp8/underflow") if k in r)
    assert any("fp8/saturated" in r for r in rows)
    assert not any(core.collect_stats for core in fps_cores(module.model))


def test_grad_norm_comes_from_the_deepspeed_engine_only():
    class Engine:
        def __init__(self, norm):
            self.norm = norm

        def get_global_grad_norm(self):
            return self.norm

    def trainer(strategy):
        return type("T", (), {"strategy": strategy})()

    deepspeed = type("DeepSpeedStrategy", (), {"deepspeed_engine": Engine(torch.tensor(2.5))})()
    assert TrainingMonitor._grad_norm(trainer(deepspeed)) == {"train/grad_norm": 2.5}
    assert TrainingMonitor._grad_norm(trainer(type("S", (), {"deepspeed_engine": Engine(None)})())) == {}
    assert TrainingMonitor._grad_norm(trainer(object())) == {}  # DDP / single device: the module logs it


def test_a_resumed_run_appends_to_its_csv_whatever_columns_it_logs(tmp_path):
    """The first session logged other keys than the resumed one (e.g. it was killed before its first per-layer
    row): the resumed session's rows are appended and the file keeps every column and every old row."""
    first = ResumableCSVLogger(tmp_path, name="logs", version="")
    first.log_metrics({"lr": 0.1}, step=0)
    first.save()
    second = ResumableCSVLogger(tmp_path, name="logs", version="")
    second.log_metrics({"train/loss": 1.5, "density/early": 0.2}, step=1)
    second.save()
    second.log_metrics({"train/loss": 1.25}, step=2)
    second.save()
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["lr"], r["train/loss"], r["density/early"]) for r in rows] == [
        ("0", "0.1", "", ""), ("1", "", "1.5", "0.2"), ("2", "", "1.25", "")]
