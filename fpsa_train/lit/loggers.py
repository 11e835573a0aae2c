"""`build_loggers(cfg, run_dir, name)`: the run's metric sinks, all under `run_dir`.

- CSV: `<run_dir>/logs/metrics.csv` (always readable without extra packages; the tests read it).
- TensorBoard: event files under `<run_dir>/tensorboard` (`tensorboard --logdir <run_dir>/tensorboard`).
- Weights & Biases: files under `<run_dir>/wandb`. Mode `auto` is online when `logger.wandb_project` and
  `logger.wandb_entity` are both set, else offline (`wandb sync <run_dir>/wandb/offline-run-*` uploads later); a
  `WANDB_MODE` in the environment wins over `auto`. `disabled` builds no W&B logger at all. Offline never opens a
  network connection.

A run folder keeps one W&B run id, so a run resumed in the same `run_dir` continues the same W&B run. The id is
stored in `<run_dir>/wandb/run_id` (written atomically by global rank 0). Until that file exists every rank derives
the same id from the folder's absolute path, so all ranks agree without talking to each other, and the file keeps
the id when the folder is moved later.

W&B keeps one active run per process (`wandb.run`), and Lightning's logger silently reuses an active run even when
it belongs to another folder. Several `train(cfg)` calls in one process (the test suite) would then write into the
first run: building a W&B logger therefore finishes an active run whose id differs from this folder's.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from fpsa_train.atomic import write_text_atomic
from fpsa_train.lit.config import LoggerConfig

log = logging.getLogger(__name__)

WANDB_PROJECT = "fpsa"
RUN_ID_FILE = "run_id"  # inside <run_dir>/wandb


def _require(package: str, key: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"{key}=true needs the `{package}` package: pip install {package} (or set {key}=false)")


def wandb_mode(cfg: LoggerConfig) -> str:
    """online, offline or disabled: the configured mode, with `auto` resolved (the environment's WANDB_MODE wins,
    else online when project and entity are set, else offline)."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":  # wandb's old name for offline
        return "offline"
    return "online" if cfg.wandb_project and cfg.wandb_entity else "offline"


def wandb_run_id(run_dir: str | Path) -> str:
    """The W&B run id of this run folder: the stored one, else derived from the folder's absolute path (the same on
    every rank); global rank 0 stores a derived id atomically."""
    folder = Path(run_dir) / "wandb"
    path = folder / RUN_ID_FILE
    try:
        stored = path.read_text().strip()
    except OSError:
        stored = ""
    if stored:
        return stored
    run_id = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    if rank_zero_only.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, run_id + "\n")
    return run_id


def _wandb_logger(cfg: LoggerConfig, run_dir: str, name: str, mode: str) -> WandbLogger:
    import wandb

    run_id = wandb_run_id(run_dir)
    if wandb.run is not None and wandb.run.id != run_id:  # another folder's run is active in this process
        log.info("finishing the active W&B run %s before starting %s", wandb.run.id, run_id)
        wandb.finish()
    log.info("W&B %s: project %s, run %s, files under %s", mode, cfg.wandb_project or WANDB_PROJECT, run_id,
             os.path.join(run_dir, "wandb"))
    # `mode=` rather than WandbLogger(offline=True), which sets WANDB_MODE for the whole process.
    logger = WandbLogger(name=name, save_dir=run_dir, id=run_id, project=cfg.wandb_project or WANDB_PROJECT,
                         entity=cfg.wandb_entity, mode=mode, log_model=False)
    logger._wandb_init.pop("anonymous", None)  # always passed by Lightning; wandb ≥ 0.19 warns that it is unused
    return logger


class ResumableCSVLogger(CSVLogger):
    """A resumed run continues its metrics.csv. Lightning's CSV writer deletes an existing metrics.csv when it is
    created, and would then rewrite the file with only the new session's columns; here the old rows are put back
    and the writer starts from their columns, so the file holds the whole run (a step logged by both sessions
    appears twice, the resumed session's row last). Only global rank 0 reads the old file: another rank reading it
    raced with rank 0's writer deleting it (FileNotFoundError in a resumed two-rank run, seen once in `make test`)."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        old = None
        if rank_zero_only.rank == 0:  # only rank 0 writes; another rank reading could meet the file mid-delete
            try:
                old = Path(path).read_text()
            except FileNotFoundError:
                pass
        writer = super().experiment
        if old and self._experiment is not None:  # rank 0's real writer (other ranks get a dummy experiment)
            Path(writer.metrics_file_path).write_text(old)
            writer.metrics_keys = sorted(set(next(csv.reader(old.splitlines()), [])))
        return writer


def build_loggers(cfg: LoggerConfig, run_dir: str, name: str) -> list[Logger]:
    """The configured loggers (CSV first: Lightning's `trainer.log_dir` is the first logger's), all under run_dir.
    Raises ImportError naming the package when an enabled logger's package is missing."""
    loggers: list[Logger] = []
    if cfg.csv:
        loggers.append(ResumableCSVLogger(run_dir, name="logs", version=""))
    if cfg.tensorboard:
        if importlib.util.find_spec("tensorboardX") is None:  # Lightning takes either
            _require("tensorboard", "logger.tensorboard")
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False))
    if cfg.wandb:
        mode = wandb_mode(cfg)
        if mode == "disabled":
            log.info("W&B disabled (logger.wandb_mode=disabled or WANDB_MODE=disabled)")
        else:
            _require("wandb", "logger.wandb")
            loggers.append(_wandb_logger(cfg, run_dir, name, mode))
    return loggers


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning writes the current training batch's metrics at (optimizer steps completed before it), so
    that metrics logged directly to the loggers share rows and x-axis values with `self.log`'s."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write metrics to every logger at `step` (the loggers write on global rank 0 only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()
