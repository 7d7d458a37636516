"""Keras-style callbacks: small objects the trainer calls when training starts, after each batch and epoch.

Each callback's state is a dict of JSON values and tensors, saved in the `last` checkpoint so a resumed run
continues exactly.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from pathlib import Path

import torch

from ocula.fileio import write_text


class Callback:
    def on_train_begin(self, trainer) -> None: ...

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
    """Save `best.ocula` whenever the monitored metric improves: the trained weights, or their EMA when given."""

    def __init__(self, path: Path, monitor: str = "val_accuracy", mode: str = "max", ema: "EMA | None" = None):
        super().__init__(monitor, mode)
        self.path, self.ema = Path(path), ema

    def on_epoch_end(self, trainer, logs):
        if self.monitor in logs and self.improved(logs[self.monitor]):
            self.best = logs[self.monitor]
            trainer.save_model(self.path, logs, self.ema.module if self.ema else None)


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


class LearningRateBudget(Callback):
    """Linear warm-up, then cosine down to `final` x the peak learning rate, over a budget of wall-clock `seconds`
    or of `steps` (whichever ends first); training stops when the budget is spent. A run that must stop at, say,
    40 minutes thus still ends at a low learning rate. A budget in steps is exactly repeatable, one in seconds not."""

    def __init__(self, *, seconds: float | None = None, steps: int | None = None, warmup: float = 0.03,
                 final: float = 0.02):
        if not (seconds or steps):
            raise ValueError("a budget needs seconds or steps")
        self.seconds, self.steps, self.warmup, self.final = seconds, steps, warmup, final
        self.done, self.elapsed, self.clock = 0, 0.0, 0.0

    def progress(self) -> float:
        parts = []
        if self.seconds:
            parts.append((self.elapsed + time.perf_counter() - self.clock) / self.seconds)
        if self.steps:
            parts.append(self.done / self.steps)
        return max(parts)

    def on_train_begin(self, trainer):
        self.peak, self.clock = trainer.config.lr, time.perf_counter()
        self._set(trainer, min(self.progress(), 1.0))

    def _set(self, trainer, t: float) -> None:
        if t < self.warmup:
            f = 0.05 + 0.95 * t / self.warmup
        else:
            f = self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * (t - self.warmup) / (1 - self.warmup)))
        for group in trainer.optimizer.param_groups:
            group["lr"] = self.peak * f

    def on_batch_end(self, trainer, loss):
        self.done += 1
        t = self.progress()
        if t >= 1:
            by_steps = self.steps and self.done >= self.steps
            spent = f"{self.steps} steps" if by_steps else f"{self.seconds / 60:.1f} minutes"
            trainer.stop(f"budget of {spent} reached")
        self._set(trainer, min(t, 1.0))

    def state_dict(self):
        return {"done": self.done, "elapsed": self.elapsed + time.perf_counter() - self.clock}

    def load_state_dict(self, state):
        self.done, self.elapsed = state["done"], state["elapsed"]


class EMA(Callback):
    """Exponential moving average of the weights (and BN statistics), the model that gets evaluated and kept.
    The decay ramps up from 0 so the early, fast-changing weights are not averaged in for long."""

    def __init__(self, model: torch.nn.Module, *, decay: float = 0.998, ramp: float = 300):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    def on_train_begin(self, trainer):
        self.module.to(trainer.device)

    @torch.no_grad()
    def on_batch_end(self, trainer, loss):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        for e, m in zip(self.module.state_dict().values(), trainer.model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)

    def state_dict(self):
        return {"updates": self.updates, "weights": dict(self.module.state_dict())}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        self.module.load_state_dict(state["weights"])


class Lookahead(Callback):
    """airbench's lookahead (from hlb-CIFAR10): every `every` steps the weights and BN statistics move to an average
    of a slow copy and themselves (slow = d x slow + (1 - d) x weights; weights = slow). The factor d grows with the
    cube of training progress up to `decay`: early training runs free, late training is averaged. The run's last
    step ends on the slow copy."""

    def __init__(self, model: torch.nn.Module, *, every: int = 5, decay: float = 0.95**5):
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
        self.every, self.decay, self.steps = every, decay, 0

    @torch.no_grad()
    def on_batch_end(self, trainer, loss):
        self.steps += 1
        total = trainer.config.epochs * len(trainer.train_batches)
        last = self.steps >= total
        if self.steps % self.every and not last:
            return
        d = 1.0 if last else self.decay * (self.steps / total) ** 3
        for k, weights in trainer.model.state_dict().items():
            if k in self.slow:
                self.slow[k].lerp_(weights, 1 - d)
                weights.copy_(self.slow[k])

    def state_dict(self):
        return {"steps": self.steps, "slow": dict(self.slow)}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        for k, v in state["slow"].items():
            self.slow[k].copy_(v)
