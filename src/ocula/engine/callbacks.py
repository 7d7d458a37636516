"""Keras-style callbacks: small objects the trainer calls after each batch and epoch.

Each callback's state is a JSON-able dict, saved in the `last` checkpoint so a resumed run continues exactly.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ocula.fileio import write_text


class Callback:
    def on_batch_end(self, trainer, loss: float) -> None: ...

    def on_epoch_end(self, trainer, logs: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class _Monitor(Callback):
    """Shared bookkeeping for callbacks that watch one logged metric."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best = -math.inf if mode == "max" else math.inf

    def improved(self, value: float) -> bool:
        return value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]


class ModelCheckpoint(_Monitor):
    """Save `best.ocula` whenever the monitored metric improves."""

    def __init__(self, path: Path, monitor: str = "val_accuracy", mode: str = "max"):
        super().__init__(monitor, mode)
        self.path = Path(path)

    def on_epoch_end(self, trainer, logs):
        if self.monitor in logs and self.improved(logs[self.monitor]):
            self.best = logs[self.monitor]
            trainer.save_model(self.path, logs)


class EarlyStopping(_Monitor):
    """Stop when the monitored metric has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 10, min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.wait = patience, 0

    def on_epoch_end(self, trainer, logs):
        if self.monitor not in logs:
            return
        if self.improved(logs[self.monitor]):
            self.best, self.wait = logs[self.monitor], 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                trainer.stop(f"early stopping: {self.monitor} did not improve for {self.patience} epochs")

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by `factor` after `patience` epochs without improvement."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", factor: float = 0.5, patience: int = 3,
                 min_lr: float = 1e-6):
        super().__init__(monitor, mode)
        self.factor, self.patience, self.min_lr, self.wait = factor, patience, min_lr, 0

    def on_epoch_end(self, trainer, logs):
        if self.monitor not in logs:
            return
        if self.improved(logs[self.monitor]):
            self.best, self.wait = logs[self.monitor], 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.wait = 0
            for group in trainer.optimizer.param_groups:
                group["lr"] = max(group["lr"] * self.factor, self.min_lr)

    def state_dict(self):
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state):
        self.best, self.wait = state["best"], state["wait"]


class CSVLogger(Callback):
    """Rewrite metrics.csv from the trainer's history each epoch (so a resumed run has no duplicate rows)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_epoch_end(self, trainer, logs):
        keys = list(dict.fromkeys(k for row in trainer.history for k in row))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(trainer.history)
        write_text(self.path, buf.getvalue())


class TerminateOnNaN(Callback):
    def on_batch_end(self, trainer, loss):
        if not math.isfinite(loss):
            trainer.stop(f"loss became {loss} at epoch {trainer.epoch + 1}; training stopped", failed=True)
