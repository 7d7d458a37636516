"""The Python face: `ocula.load` a model file or `ocula.train` one, then predict, evaluate and export through one
object whatever the task. The CLI, the benchmarks and the server all go through here.

    model = ocula.load("runs/classify/mnist-cnn/model.ocula", device="auto")
    model.predict(["photo.jpg", array, pil_image])     # typed results, each with .to_json()
    model.evaluate("mnist", split="test")              # metrics as a dict
    model.export("onnx")                               # checked against torch
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from ocula.errors import OculaError
from ocula.fileio import write_json


class Model:
    """A trained model, its metadata (`info`: task, classes, preprocessing, metrics) and the device it runs on.

    `module` is the plain torch nn.Module; `path` the file it came from; after `ocula.train`, `run_dir` and
    `summary` describe the run."""

    def __init__(self, module, *, path: str | Path | None = None, run_dir: Path | None = None,
                 summary: dict | None = None):
        from ocula.tasks import get_task

        self.module, self.path, self.run_dir, self.summary = module, path and Path(path), run_dir, summary or {}
        self.task = get_task(module.info.task)

    @property
    def info(self):
        return self.module.info

    @property
    def device(self):
        from ocula.engine.device import device_of

        return device_of(self.module)

    def to(self, device: str = "auto") -> "Model":
        from ocula.engine.device import resolve_device

        self.module.to(resolve_device(device))
        return self

    def predict(self, inputs, *, batch_size: int | None = None, **options) -> list:
        """Results for a path, a folder, a list of paths, a numpy HxW(xC) array, a PIL image or a tensor batch
        [N, C, H, W] (pixel values), each prepared by the model's own recorded preprocessing."""
        images, sources = read_inputs(inputs)
        if batch_size is not None:
            options["batch_size"] = batch_size
        return _call(self.task.predict, f"{self.info.task} prediction", self.module, images, sources, **options)

    def evaluate(self, data: str | Path | None = None, *, split: str | None = None, data_dir=None,
                 out: str | Path | None = None) -> dict:
        """Metrics on a split of a registered dataset or a folder (default: the dataset the model was trained on).
        The split defaults to test, else val, else the only split of a folder given here. With `out`, also
        eval.json and figures there."""
        given = data is not None
        data = str(data or self.info.preprocess.get("dataset") or "")
        if not data:
            raise OculaError(f"{self.path or 'this model'} does not name the dataset it was trained on; pass one")
        dataset = (self.task.load_data(data, split, data_dir) if split else
                   _default_dataset(self.task, data, data_dir, only=given))
        return self.task.evaluate(self.module, dataset, Path(out) if out else None)

    def sample(self, n: int = 64, *, seed: int = 0, interpolate=None, steps: int = 10) -> np.ndarray:
        """A generative model's (VAE, GAN) images decoded from n codes of its prior, or with `interpolate` (two
        images of any input kind) the decoded line between their codes: [n, H, W(, C)] in the native range."""
        if not hasattr(self.task, "sample"):
            raise OculaError(f"{self.info.task} models do not sample; representation models (vae, dcgan) do")
        between = read_inputs(list(interpolate))[0] if interpolate is not None else None
        if between is not None and len(between) != 2:
            raise OculaError(f"interpolate between two images, not {len(between)}")
        return self.task.sample(self.module, n, seed=seed, between=between, steps=steps)

    def export(self, format: str = "onnx", path: str | Path | None = None) -> str:
        """Write the model as ONNX (checked against torch with ONNX Runtime) or CoreML; returns what was done."""
        suffix = {"onnx": ".onnx", "coreml": ".mlpackage"}
        if format not in suffix:
            raise OculaError(f"unknown export format {format!r}; choose onnx or coreml")
        if path is None and self.path is None:
            raise OculaError("pass a path to export to (this model was not loaded from a file)")
        module = self.module
        if self.device.type != "cpu":  # exporters trace on the CPU
            module = copy.deepcopy(module).cpu()
            module.info = self.info
        return self.task.export(module, format, Path(path or self.path.with_suffix(suffix[format])))

    def __repr__(self) -> str:
        i = self.info
        return (f"ocula.Model(task={i.task!r}, arch={i.arch!r}, classes={len(i.classes)}, device={self.device}, "
                f"path={str(self.path) if self.path else None!r})")


def load(path: str | Path, device: str = "auto") -> Model:
    """Load a model file (`.ocula`) onto `device` ('auto' picks CUDA when present)."""
    from ocula.modelfile import load_model

    return Model(load_model(path, device=device), path=path)


def train(data: str | Path | None = None, model: str | None = None, *, config: str | Path | None = None,
          name: str | None = None, runs_dir: str | Path = "runs", resume: bool = False, overwrite: bool = False,
          data_dir=None, progress: bool = True, **settings) -> Model:
    """Train `model` (default: the task's first) on `data`, a registered dataset name or a folder whose layout
    names the task; `settings` are training options (epochs, lr, batch_size, device, ...) and the task's own
    (see `ocula.tasks.<task>.OPTIONS`). Writes runs/<task>/<name>/ and returns the trained Model.

    `config` reruns a run from its config.json (explicit arguments win); `resume` continues the run in
    runs/<task>/<name>/ from its last.ocula, optionally with other runtime settings (threads, device, compile)
    or more epochs. Under torchrun every rank trains its slice of each batch and only rank 0 writes the run folder
    (the other ranks write to a private temporary folder that is removed afterwards)."""
    from ocula.data.layout import resolve_task
    from ocula.engine import distributed
    from ocula.engine.trainer import RUNTIME, TrainConfig
    from ocula.modelfile import save_model
    from ocula.tasks import get_task

    if config is not None:
        saved = _read_config(Path(config))
        data, model = data or saved["data"], model or saved["model"]
        settings = {**saved["train"], **saved["options"], **settings}
    if data is None:
        raise OculaError("train needs a dataset name or folder (or a config)")
    data = str(data)
    task_name = _task_for(resolve_task(data, data_dir), model)
    task = get_task(task_name)
    run_dir = Path(runs_dir) / task_name / (name or f"{Path(data).name}-{model or task.MODELS[0]}")
    if resume:
        saved = _read_config(run_dir / "config.json")
        model = model or saved["model"]
        settings = _resumed_settings(saved, run_dir, data, model, settings, RUNTIME)
    elif run_dir.exists() and distributed.is_main():
        if not overwrite:
            raise OculaError("run folder exists; pass resume to continue it, overwrite to replace it, or a new "
                             "name", run_dir)
        shutil.rmtree(run_dir)
    model = model or task.MODELS[0]
    train_names = {f.name for f in fields(TrainConfig)}
    unknown = set(settings) - train_names - set(task.OPTIONS)
    if unknown:
        raise OculaError(f"unknown option(s) for {task_name}: {', '.join(sorted(unknown))}; training options: "
                         f"{', '.join(sorted(train_names))}; {task_name} options: {', '.join(task.OPTIONS)}")
    train_config = task.default_config(model, **{k: v for k, v in settings.items() if k in train_names})
    options = {**task.OPTIONS, **{k: v for k, v in settings.items() if k in task.OPTIONS}}
    if not distributed.is_main():
        return _train_rank(task, data, model, train_config, run_dir, data_dir, resume, options)
    write_json(run_dir / "config.json", {"task": task_name, "data": data, "model": model,
                                         "train": asdict(train_config), "options": options})
    start = time.perf_counter()
    module, summary = task.train(data, model, train_config, run_dir=run_dir, data_dir=data_dir, resume=resume,
                                 progress=progress, **options)
    seconds = round(time.perf_counter() - start, 2)
    module.info.metrics["train_seconds"] = seconds
    save_model(run_dir / "model.ocula", module, module.info)
    summary = {"task": task_name, "data": data, "model": model, **summary, "train_seconds": seconds,
               "model_file": str(run_dir / "model.ocula")}
    write_json(run_dir / "summary.json", summary)
    return Model(module, path=run_dir / "model.ocula", run_dir=run_dir, summary=summary)


def _task_for(data_task: str, model: str | None) -> str:
    """The data's task, or another task that reads the same data and trains `model` (class folders also feed
    the nearest-neighbour recogniser: `ocula.train("cifar10", "1nn", embedder=...)`)."""
    from ocula.tasks import TASKS, get_task

    reads = get_task(data_task).load_data
    if model is None or model in get_task(data_task).MODELS:
        return data_task
    return next((t for t in TASKS if model in get_task(t).MODELS and get_task(t).load_data is reads), data_task)


def _train_rank(task, data, model, config, run_dir: Path, data_dir, resume: bool, options: dict) -> Model:
    """A rank other than 0: the same training in a private folder (resuming from rank 0's checkpoint)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ocula-rank-") as work:
        module, summary = task.train(data, model, config, run_dir=Path(work), data_dir=data_dir,
                                     resume=resume and run_dir / "last.ocula", progress=False, **options)
    return Model(module, summary=summary)


def show_data(data: str, *, split: str | None = None, n: int = 32, out: str | Path | None = None,
               data_dir=None) -> Path:
    """A PNG sheet of a dataset's samples (registered name or folder) with their labels, masks or boxes."""
    from ocula.data.layout import resolve_task, splits
    from ocula.tasks import get_task

    task = get_task(resolve_task(data, data_dir))
    split = split or splits(data, data_dir)[0]
    out = Path(out or f"{Path(data).name}-{split}.png")
    return task.show(task.load_data(data, split, data_dir), n, out)


def _read_config(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        return {k: saved[k] for k in ("task", "data", "model", "train", "options")}
    except FileNotFoundError:
        raise OculaError("run config not found", path) from None
    except (ValueError, KeyError, TypeError) as e:
        raise OculaError(f"not an ocula run config ({e})", path) from None


def _resumed_settings(saved: dict, run_dir: Path, data: str, model: str, given: dict, runtime: tuple) -> dict:
    """The run's recorded settings, with only the runtime ones (and more epochs) taken from `given`."""
    if (saved["data"], saved["model"]) != (data, model):
        raise OculaError(f"this run trained {saved['model']} on {saved['data']}, not {model} on {data}", run_dir)
    recorded = {**saved["train"], **saved["options"]}
    changed = sorted(k for k, v in given.items() if k not in runtime and recorded.get(k) != v)
    if changed:
        raise OculaError(f"a resumed run keeps its settings; {', '.join(changed)} differ (only "
                         f"{', '.join(runtime)} may change)", run_dir)
    return {**recorded, **given}


def _default_dataset(task, data: str, data_dir=None, only: bool = False):
    """The split to score a model on, loaded once: test, else val, when it has labels (SigTuple's test smears
    have no masks); with `only`, a dataset's single split (a folder of images kept for evaluation)."""
    from ocula.data.layout import splits

    have = splits(data, data_dir)
    for split in ("test", "val"):
        if split in have:
            dataset = task.load_data(data, split, data_dir)
            if getattr(dataset, "has_masks", True):
                return dataset
    if only and len(have) == 1:
        return task.load_data(data, have[0], data_dir)
    raise OculaError(f"{data} has no labelled test or val split; choose one of its splits: {', '.join(have)}")


def _call(fn, what: str, *args, **options):
    """Call a task function, turning an unknown option into a one-line error that lists the known ones."""
    params = inspect.signature(fn).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        known = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY]
        raise OculaError(f"unknown option(s) for {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return fn(*args, **options)


def read_inputs(inputs) -> tuple[list[np.ndarray], list[str]]:
    """Images (uint8 or float arrays HxW or HxWxC) and their sources from any of the inputs `Model.predict` takes."""
    from PIL import Image

    from ocula.data.images import list_images, read_image, to_mode

    if isinstance(inputs, (str, Path)):
        path = Path(inputs)
        if path.is_dir():
            files = list_images(path)
            if not files:
                raise OculaError("no images in folder", path)
            return [read_image(f) for f in files], [str(f) for f in files]
        return [read_image(path)], [str(path)]
    if isinstance(inputs, Image.Image):
        return [np.asarray(to_mode(inputs, "RGB"))], ["<PIL image>"]
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 3 and inputs.shape[2] not in (1, 3, 4):
            raise OculaError(f"a 3-D array is one HxWxC image with 1, 3 or 4 channels, not {inputs.shape}; pass a "
                             "stack of grey images as NxHxWx1")
        if inputs.ndim in (2, 3):
            return [inputs], ["<array>"]
        if inputs.ndim == 4:
            return list(inputs), [f"<array {i}>" for i in range(len(inputs))]
        raise OculaError(f"an image array is HxW, HxWxC or NxHxWxC, not {inputs.ndim}-dimensional")
    if type(inputs).__module__.startswith("torch"):
        x = inputs.detach().cpu()
        x = x[None] if x.dim() == 3 else x
        if x.dim() != 4:
            raise OculaError(f"an image tensor is [C, H, W] or [N, C, H, W], not {tuple(x.shape)}")
        return [a for a in x.permute(0, 2, 3, 1).numpy()], [f"<tensor {i}>" for i in range(len(x))]
    if isinstance(inputs, (list, tuple)):
        images, sources = [], []
        for item in inputs:
            i, s = read_inputs(item)
            images += i
            sources += s
        return images, sources
    raise OculaError(f"cannot predict on a {type(inputs).__name__}; pass paths, arrays, PIL images or tensors")
