"""The training loop shared by every task: seeded, resumable, with Keras-style callbacks.

Repeatability: each epoch reseeds torch's global RNG (dropout) and the batch generator (shuffle, augmentation)
from (seed, epoch). A resumed run therefore replays exactly what an uninterrupted run would have done,
given the model, optimizer, scheduler and callback states stored in `last.ocula`.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from ocula.engine.callbacks import EMA, Callback, CSVLogger, EarlyStopping, Lookahead, ModelCheckpoint, \
    ReduceLROnPlateau, TerminateOnNaN
from ocula.engine import distributed
from ocula.engine.batches import prefetch
from ocula.engine.device import autocast, fork_rng, grad_scaler, resolve_device, runtime, to_device
from ocula.errors import OculaError
from ocula.modelfile import ModelInfo, read_model_file, save_model


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # onecycle | triangle | cosine | plateau | constant
    warmup: float = 0.15  # one-cycle and triangle: fraction of steps spent warming up
    norm_lr_scale: float = 1.0  # learning-rate factor for normalisation layers' parameters (airbench: 64)
    lookahead: int = 0  # steps between lookahead averages of the weights (airbench: 5); 0 = off
    ema: float = 0.0  # decay of a moving average of the weights, the model that is evaluated and kept; 0 = off
    label_smoothing: float = 0.0
    seed: int = 0
    monitor: str = "val_accuracy"
    mode: str = "max"
    early_stopping: int = 0  # patience in epochs; 0 = off
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    channels_last: bool = False
    bf16: bool = False  # mixed precision: bfloat16 autocast on CPUs (AVX-512 BF16), bf16 or fp16 on GPUs
    compile: bool = False  # torch.compile the training step's model
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    sync_bn: bool = False  # under torchrun: batch-norm statistics over the global batch, not each rank's slice

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise OculaError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**d)


# Settings a resumed run may change: where and how fast it runs, and (only upwards) how long.
RUNTIME = ("threads", "device", "compile", "epochs")


def _split_state(obj, prefix: str, tensors: dict):
    """Replace tensors inside a nested state dict by references, collecting them in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join_state(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def _int_keys(d: dict) -> dict:
    """JSON turns the optimizer's integer parameter ids into strings; turn them back."""
    return {int(k): v for k, v in d.items()}


class Trainer:
    """fit() runs `loss_fn(model, x, y)` over `train_batches(generator)` and `evaluate_fn(model)` each epoch."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, *, loss_fn, train_batches, evaluate_fn=None,
                 info: ModelInfo, run_dir: str | Path | None = None, callbacks: list[Callback] | None = None,
                 progress: bool = True):
        self.model, self.config, self.info = model, config, info
        self.loss_fn, self.train_batches, self.evaluate_fn = loss_fn, train_batches, evaluate_fn
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress and distributed.is_main()
        self.history: list[dict] = []
        self.epoch = 0  # epochs completed
        self.stop_reason: str | None = None
        self.failed = False
        self.device = distributed.setup(resolve_device(config.device))
        self.model = self.model.to(self.device)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.scaler = grad_scaler(self.device, config.bf16)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        # The average's decay ramps up over one horizon (1 / (1 - decay) steps): short runs get averaged too.
        self.ema = EMA(self.model, decay=config.ema, ramp=1 / (1 - config.ema)) if config.ema else None
        # The average runs whatever callbacks are given: kept_model must never be a stale copy.
        self.callbacks = ([self.ema] if self.ema else []) + (callbacks if callbacks is not None
                                                             else self.default_callbacks())
        self._step_model = self._parallel(self.model)
        self.flops_per_image: float | None = None  # counted on the run's first batch

    def _parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DistributedDataParallel under torchrun, compiled on request. The
        plain `self.model` is what gets saved, so model files carry no wrapper prefixes."""
        if distributed.world_size() > 1:
            from torch.nn.parallel import DistributedDataParallel

            if self.config.sync_bn:
                if self.device.type != "cuda":
                    raise OculaError("sync_bn needs CUDA: torch's SyncBatchNorm runs on GPUs only")
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                self.model = model
            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None)
        return torch.compile(model) if self.config.compile else model

    def default_callbacks(self) -> list[Callback]:
        c = self.config
        cbs: list[Callback] = [TerminateOnNaN()]
        if self.run_dir:
            cbs += [ModelCheckpoint(self.run_dir / "best.ocula", c.monitor, c.mode, self.ema),
                    CSVLogger(self.run_dir / "metrics.csv")]
        if c.schedule == "plateau":
            cbs.append(ReduceLROnPlateau(c.monitor, c.mode, c.plateau_factor, c.plateau_patience))
        if c.early_stopping:
            cbs.append(EarlyStopping(c.monitor, c.mode, c.early_stopping))
        if c.lookahead:
            cbs.append(Lookahead(self.model, every=c.lookahead))
        return cbs

    def _param_groups(self) -> list[dict]:
        """One group, or with `norm_lr_scale` two: normalisation layers' parameters (not scale-invariant, unlike
        the weights before them) learn that much faster, with their weight decay divided by the same factor so
        that the decay per step (learning rate x weight decay) stays that of the other weights."""
        c, params = self.config, [p for p in self.model.parameters() if p.requires_grad]
        if c.norm_lr_scale == 1:
            return [dict(params=params)]
        norms = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm)
        in_norms = {id(p) for m in self.model.modules() if isinstance(m, norms) for p in m.parameters()}
        return [dict(params=[p for p in params if id(p) not in in_norms]),
                dict(params=[p for p in params if id(p) in in_norms], lr=c.lr * c.norm_lr_scale,
                     weight_decay=c.weight_decay / c.norm_lr_scale)]

    def _make_optimizer(self):
        c, groups = self.config, self._param_groups()
        if c.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=True)
        raise OculaError(f"unknown optimizer {c.optimizer!r} (adamw or sgd)")

    def _make_scheduler(self):
        c, total = self.config, max(1, self.config.epochs * len(self.train_batches))
        peaks = [group["lr"] for group in self.optimizer.param_groups]
        if c.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=peaks, total_steps=total,
                                                       pct_start=c.warmup)
        if c.schedule == "triangle":  # airbench's: linear from 0.2 x the peak up to it, then down to 0.07 x
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=peaks, total_steps=total,
                                                       pct_start=c.warmup, anneal_strategy="linear",
                                                       cycle_momentum=False, div_factor=5, final_div_factor=0.2 / 0.07)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
        if c.schedule in ("plateau", "constant"):
            return None
        raise OculaError(f"unknown schedule {c.schedule!r} (onecycle, cosine, plateau or constant)")

    def stop(self, reason: str, failed: bool = False) -> None:
        self.stop_reason, self.failed = reason, failed

    @property
    def kept_model(self) -> torch.nn.Module:
        """What training produces: the moving average of the weights when there is one, else the weights."""
        return self.ema.module if self.ema else self.model

    # --- checkpoints -------------------------------------------------------------------------------------
    def save_model(self, path: Path, logs: dict, module: torch.nn.Module | None = None) -> Path:
        """Save `module` (default: the trained model) with the epoch's metrics."""
        self.info.metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        return save_model(path, module if module is not None else self.model, self.info)

    def save_last(self, path: Path) -> Path:
        tensors: dict = {}
        state = {
            "epoch": self.epoch,
            "history": self.history,
            "config": asdict(self.config),
            "optimizer": _split_state(self.optimizer.state_dict(), "optimizer", tensors),
            "scheduler": _split_state(self.scheduler.state_dict(), "scheduler", tensors) if self.scheduler else None,
            "callbacks": [_split_state(cb.state_dict(), f"callbacks.{i}", tensors)
                          for i, cb in enumerate(self.callbacks)],
        }
        return save_model(path, self.model, self.info, extra_tensors=tensors, extra_metadata={"train_state": state})

    def load_last(self, path: Path) -> None:
        from ocula.modelfile import TRAIN_PREFIX

        _, tensors, metadata = read_model_file(path)
        if "train_state" not in metadata:
            raise OculaError("no training state in this file (resume needs last.ocula)", path)
        state = json.loads(metadata["train_state"])
        now = asdict(self.config)
        changed = sorted(k for k in state["config"] if state["config"][k] != now.get(k) and k not in RUNTIME)
        if changed:
            raise OculaError(f"cannot resume with a different config (changed: {', '.join(changed)}; only "
                             f"{', '.join(RUNTIME)} may change)", path)
        if self.config.epochs < state["epoch"]:
            raise OculaError(f"cannot resume for {self.config.epochs} epochs: {state['epoch']} are done", path)
        extra = {k[len(TRAIN_PREFIX):]: v for k, v in tensors.items() if k.startswith(TRAIN_PREFIX)}
        self.model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(TRAIN_PREFIX)})
        opt = _join_state(state["optimizer"], extra)
        opt["state"] = _int_keys(opt["state"])
        self.optimizer.load_state_dict(opt)
        if self.scheduler:
            self.scheduler.load_state_dict(_join_state(state["scheduler"], extra))
            self._stretch_schedule()
        for cb, s in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(_join_state(s, extra))
        self.epoch, self.history = state["epoch"], state["history"]

    def _stretch_schedule(self) -> None:
        """More epochs on resume: the step schedule spans the new total (the config already says it)."""
        total = max(1, self.config.epochs * len(self.train_batches))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR):
            self.scheduler.total_steps = total
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            self.scheduler.T_max = total

    # --- the loop ----------------------------------------------------------------------------------------
    def _train_epoch(self) -> tuple[float, int]:
        """One epoch; returns (mean loss, images seen by all ranks)."""
        c = self.config
        # The batch generator is the same on every rank (they slice one global batch); dropout differs per rank.
        torch.manual_seed(c.seed * 100_003 + self.epoch + 7_919 * distributed.rank())
        g = torch.Generator().manual_seed(c.seed * 100_003 + self.epoch)
        if hasattr(self.train_batches, "set_epoch"):  # batches that change with the epoch's parity (airbench)
            self.train_batches.set_epoch(self.epoch)
        self.model.train()
        total, count = 0.0, 0
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.train_batches), desc=f"epoch {self.epoch + 1}/{c.epochs}", leave=False,
                       unit="batch")
        for x, y in prefetch(self.train_batches(g), pin=self.device.type == "cuda"):
            x, y = to_device(distributed.shard(x), self.device), to_device(distributed.shard(y), self.device)
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            value, n = self._step(x, y)
            total, count = total + value * n, count + n
            for cb in self.callbacks:
                cb.on_batch_end(self, value)
            if distributed.agree([float(self.stop_reason is not None)], self.device)[0] and not self.stop_reason:
                self.stop("another rank stopped")  # e.g. its share of a wall-clock budget ran out first
            if bar:
                bar.update()
                bar.set_postfix(loss=f"{value:.4f}")
            if self.stop_reason:
                break
        if bar:
            bar.close()
        return total / max(count, 1), count

    def _step(self, x, y) -> tuple[float, int]:
        """One optimizer step; returns the loss averaged over the ranks' slices and the global batch size."""
        if self.flops_per_image is None:
            self.flops_per_image = self._count_flops(x, y)
        with autocast(self.device, self.config.bf16):
            loss = self.loss_fn(self._step_model, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler:
            self.scheduler.step()
        summed, n = distributed.agree([float(loss.detach()) * len(y), float(len(y))], self.device)
        return summed / max(n, 1), int(n)

    def _count_flops(self, x, y) -> float:
        """Floating-point operations of one training step (forward and backward) per image, counted on a copy
        of the model: a counting pass must not move the weights, the batch-norm statistics or the RNG, and
        counting the real step would change its kernels (a resumed run would then differ from a straight one)."""
        from torch.utils.flop_counter import FlopCounterMode

        model = copy.deepcopy(self.model)
        with fork_rng(self.device), FlopCounterMode(display=False) as counter:
            with autocast(self.device, self.config.bf16):
                loss = self.loss_fn(model, x, y)
            loss.backward()
        return counter.get_total_flops() / max(len(y), 1)

    def fit(self, resume: bool | str | Path = False) -> list[dict]:
        """Train until config.epochs (or a callback stops it); seeds and threads are restored afterwards.
        `resume`: continue from the run folder's last.ocula, or from the checkpoint at this path."""
        with runtime(seed=self.config.seed, threads=self.config.threads, device=self.device):
            return self._fit(resume)

    def _fit(self, resume: bool | str | Path) -> list[dict]:
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        last = self.run_dir / "last.ocula" if self.run_dir else None
        if resume:
            last = Path(resume) if isinstance(resume, (str, Path)) else last
            if not (last and last.is_file()):
                raise OculaError("nothing to resume: no last.ocula", last or "run folder")
            self.load_last(last)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        while self.epoch < self.config.epochs and not self.stop_reason:
            start = time.perf_counter()
            loss, images = self._train_epoch()
            if self.failed:
                break
            seconds = time.perf_counter() - start
            logs = {"epoch": self.epoch + 1, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                    "train_seconds": seconds, **speed(images, seconds, self.flops_per_image, self.device,
                                                      self.config.bf16)}
            if self.evaluate_fn:
                self.model.eval()
                with torch.no_grad():
                    logs.update({f"val_{k}": v for k, v in self.evaluate_fn(self.kept_model).items()})
            self.history.append(logs)
            self.epoch += 1
            for cb in self.callbacks:
                cb.on_epoch_end(self, logs)
            if last:
                self.save_last(last)
            if self.progress:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if k not in ("epoch", "lr"))
                print(f"epoch {logs['epoch']}/{self.config.epochs}: {shown}", flush=True)
        self.model.eval()
        if self.failed:
            raise OculaError(self.stop_reason)
        return self.history


def speed(images: int, seconds: float, flops_per_image: float | None, device: torch.device, bf16: bool) -> dict:
    """Images per second and the compute they took (FLOP/s of forward + backward), beside the matmul peak of this
    machine in the training precision."""
    from ocula.engine.peak import matmul_peak

    out = {"images_per_second": images / seconds}
    if flops_per_image:
        achieved = flops_per_image * images / seconds / distributed.world_size()  # per process
        peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32)
        out.update(tflops=achieved / 1e12, peak_fraction=achieved / peak)
    return out
