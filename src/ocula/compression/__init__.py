"""CNN compression: each method turns a trained classifier's model file into a smaller or faster one that
`ocula.load`, predict, evaluate and export accept (int8 is an ONNX file that `ocula.load` runs in ONNX Runtime).

    ocula compress runs/classify/mnist-cnn/model.ocula --method structured --out pruned.ocula
    ocula.compress("model.ocula", "int8", "model-int8.onnx")

Fine-tuning goes through the classify task's trainer on the model's own training data, with the same seeded
validation hold-out as `ocula train`; the test split is never looked at.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ocula.errors import OculaError

# torch is imported inside the functions: the CLI reads METHODS to build its help without loading torch.

METHODS = {
    "magnitude": "unstructured magnitude pruning + fine-tuning, stored sparse",
    "structured": "filter pruning to a FLOPs budget, each layer's width from its measured sensitivity, + "
                  "fine-tuning: a physically smaller network",
    "distill": "a small cnn student trained from the model (the teacher, any classifier) with Hinton's "
               "distillation loss",
    "int8": "int8 post-training static quantization (ONNX Runtime QDQ, per channel): an .onnx file",
    "qat": "quantization-aware training: fine-tuning through simulated int8 rounding, then int8: an .onnx file",
    "tucker": "Tucker-2 of the convolutions (SVD of linear layers) + fine-tuning",
    "cp": "CP decomposition of the convolutions (SVD of linear layers) + fine-tuning",
    "bwn": "binary-weight network + fine-tuning, weights stored as 1 bit",
    "xnor": "XNOR-Net (binary weights and inputs) + fine-tuning, weights stored as 1 bit",
}
QUANTIZED = ("int8", "qat")  # methods that write an int8 ONNX file
# What `amount` means and its default, per method: the share of weights zeroed, of FLOPs removed, of channels kept
# as the rank, of the teacher's stage widths the student gets.
AMOUNT = {"magnitude": 0.8, "structured": 0.5, "tucker": 0.5, "cp": 0.5, "distill": 0.5}


@dataclass
class CompressConfig:
    amount: float | None = None  # see AMOUNT
    widths: list[int] | None = None  # distill: the student cnn's stage widths (default: amount x a cnn teacher's)
    epochs: int = 2  # fine-tuning (distill: the student's training; qat: simulated int8) epochs; 0: none
    lr: float = 1e-3
    batch_size: int = 128
    temperature: float = 4.0  # distill: softmax temperature
    alpha: float = 0.9  # distill: weight of the soft-target loss
    calibration: int = 512  # int8, qat: training images that calibrate the activation ranges
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    bf16: bool = False
    channels_last: bool = False


def compress(model: str | Path, method: str, out: str | Path, *, data: str | None = None, data_dir=None,
             progress: bool = True, **settings):
    """Compress the network in model file `model` with `method` (see METHODS) into `out` (.ocula, or .onnx for
    int8); `data` defaults to the dataset the model was trained on. int8 takes any task's network (classifier,
    segmenter, detector); the other methods take classifiers. Returns the new ocula.Model, whose `summary` holds
    the method, file sizes, FLOPs, fine-tuning seconds per epoch and (classifiers) validation accuracy."""
    import ocula
    from ocula.tasks import classify

    if method not in METHODS:
        raise OculaError(f"unknown compression method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = set(settings) - {f.name for f in fields(CompressConfig)}
    if unknown:
        raise OculaError(f"unknown option(s) for compress: {', '.join(sorted(unknown))}")
    config = CompressConfig(**settings)
    out, want = Path(out), ".onnx" if method in QUANTIZED else ".ocula"
    if out.suffix != want:
        raise OculaError(f"{method} writes a {want} file, not {out.suffix or 'a file without suffix'}", out)
    source = ocula.load(model, device=config.device)
    _check_compressible(source.module, model, method, config)
    data = str(data or source.info.preprocess.get("dataset") or "")
    if not data:
        raise OculaError(f"{model} does not name the dataset it was trained on; pass data")
    start = time.perf_counter()
    if method in QUANTIZED:
        return _int8(source, model, out, data, data_dir, config, start, progress, aware=method == "qat")
    fit, val = classify.split_validation(classify.load_data(data, "train", data_dir), config.val_fraction,
                                         config.seed)
    classify._check_fits(source.module, fit)
    example = classify.to_tensor(fit.images[:1])
    before = flops(source.module, example)
    module, epoch_seconds = _METHOD[method](source.module, fit, val, config, out, progress)
    seconds = time.perf_counter() - start
    from ocula.modelfile import save_model

    module.info.metrics = {}  # the source's metrics describe another network
    save_model(out, module, module.info)
    result = ocula.load(out, device=config.device)
    val_accuracy = classify.evaluate(result.module, val)["accuracy"] if val is not None else None
    result.summary = _summary(method, model, out, config, seconds, flops(result.module, example), before,
                              epoch_seconds=epoch_seconds, val_accuracy=val_accuracy)
    return result


def _summary(method, source, out, config, seconds, after_flops, before_flops, **extra) -> dict:
    return {"method": method, "source": str(source), "file": str(out), "settings": asdict(config),
            "bytes": Path(out).stat().st_size, "source_bytes": Path(source).stat().st_size, "flops": after_flops,
            "source_flops": before_flops, "seconds": round(seconds, 2), **extra}


def flops(module, x) -> int:
    """Floating-point operations of one forward pass on tensor `x` (torch's FlopCounterMode: convolutions and
    matmuls)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ocula.engine.device import device_of

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(x.to(device_of(module)))
    return int(counter.get_total_flops())


def _check_compressible(module, path, method: str, config: CompressConfig) -> None:
    from ocula.compression.pruning import weights

    if hasattr(module, "session") or not weights(module) or module.info.arch == "svc":  # an ONNX file, an SVC
        raise OculaError(f"compress takes a network; this is a {module.info.task} {module.info.arch} model", path)
    if method == "int8" and module.info.task == "detect" and module.info.arch != "fcos":
        raise OculaError(f"int8 quantizes fcos among detectors; {module.info.arch}'s graph (RoIAlign, NMS between "
                         "its stages) stays float", path)
    if method != "int8" and module.info.task != "classify":
        raise OculaError(f"{method} compresses classifiers (int8 takes any network); this is a "
                         f"{module.info.task} {module.info.arch} model", path)
    if method == "distill" and config.widths is None and module.info.arch != "cnn":
        raise OculaError(f"distill: give the student's widths; a {module.info.arch} teacher has no cnn widths to "
                         "scale", path)


def finetune(model, fit, val, config: CompressConfig, progress: bool, loss=None):
    """Train `model` (with its .info) for config.epochs on `fit` with the classify task's trainer; returns the
    model and the mean seconds per epoch (None without epochs)."""
    from ocula.engine.trainer import TrainConfig
    from ocula.tasks import classify

    if config.epochs == 0:
        return model, None
    train = TrainConfig(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                        threads=config.threads, device=config.device, bf16=config.bf16,
                        channels_last=config.channels_last, monitor="val_accuracy", mode="max")
    info = model.info
    model, _, history = classify.train_cnn(fit, train, val=val, progress=progress, model=model, loss=loss)
    model.info = info
    return model, round(sum(h["train_seconds"] for h in history) / len(history), 2)


def _rebuilt(model, specs: dict):
    """The model's ModelInfo for the `compressed` architecture: its own architecture with `specs` swapped in."""
    info = copy.deepcopy(model.info)
    info.args = {"base": info.arch, "base_args": info.args, "layers": specs}
    info.arch = "compressed"
    return info


def _magnitude(model, fit, val, config, out, progress):
    from ocula.compression.packing import packed_spec
    from ocula.compression.pruning import mask_smallest, unmask

    names = mask_smallest(model, _amount("magnitude", config))
    model, seconds = finetune(model, fit, val, config, progress)  # pruned weights stay zero under the mask
    unmask(model)
    model.info.extra = {**model.info.extra, "packed": {**model.info.extra.get("packed", {}),
                                                       **packed_spec(model, "sparse", names)}}
    return model, seconds


def _structured(model, fit, val, config, out, progress):
    """Remove whole filters, as many from each conv as its measured sensitivity allows (see allocate_widths),
    until the network needs at most (1 - amount) of the FLOPs, then fine-tune."""
    import torch
    import torch.nn.functional as F

    from ocula.compression.pruning import allocate_widths, prune_filters
    from ocula.tasks import classify

    probe = val if val is not None else fit  # the sensitivity's loss: on up to 1024 held-out images
    x, y = classify.to_tensor(probe.images[:1024]), torch.from_numpy(probe.labels[:1024])

    def probe_loss(m):
        with torch.no_grad():
            return float(F.cross_entropy(classify.batched_forward(m, x), y))

    widths = allocate_widths(model, x[:1], _amount("structured", config), probe_loss)
    model.info = _rebuilt(model, prune_filters(model, widths))
    return finetune(model, fit, val, config, progress)


def _lowrank(decomposition: str):
    def method(model, fit, val, config, out, progress):
        from ocula.compression.lowrank import factorise

        model.info = _rebuilt(model, factorise(model, decomposition, _amount(decomposition, config), config.seed))
        return finetune(model, fit, val, config, progress)

    return method


def _binary(binary_inputs: bool):
    def method(model, fit, val, config, out, progress):
        """Binarize every convolution but the first (the stem sees the raw image; XNOR-Net keeps it real)."""
        import torch

        from ocula.compression.layers import make_layer, replace
        from ocula.compression.packing import packed_spec
        from ocula.compression.pruning import batch_norm_after, weights

        convs = [(name, m) for name, m in weights(model) if isinstance(m, torch.nn.Conv2d)][1:]
        specs = {}
        for name, old in convs:
            specs[name] = {"binary": {"inputs": binary_inputs}}
            new = make_layer(old, specs[name])
            new.load_state_dict(old.state_dict())
            replace(model, name, new)
        info = _rebuilt(model, specs)
        model.info = info
        model, seconds = finetune(model, fit, val, config, progress)
        # Each binary conv's batch norm folds into its alpha and a bias: 2 floats per channel stored, not 5.
        after = batch_norm_after(model)
        for name, _ in convs:
            if name in after:
                replace(model, name, model.get_submodule(name).fold(model.get_submodule(after[name]).eval()))
                replace(model, after[name], torch.nn.Identity())
                specs[name] = {"binary": {"inputs": binary_inputs, "bias": True}}
                specs[after[name]] = {"identity": True}
        info.args["layers"] = specs
        model.info = info
        info.extra = {**info.extra, "packed": packed_spec(model, "sign", [f"{name}.weight" for name, _ in convs])}
        return model, seconds

    return method


def _distill(teacher, fit, val, config, out, progress):
    """A cnn student with `widths` (or `amount` times a cnn teacher's stage widths), trained from scratch on the
    softened outputs of the teacher (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) *
    CE. The teacher sees each augmented batch the student sees, in one view (its test-time views switched off)."""
    from ocula.engine.device import runtime
    from ocula.models import build
    from ocula.tasks import classify

    widths = config.widths or [max(1, round(w * _amount("distill", config))) for w in teacher.info.args["widths"]]
    args = classify.cnn_args(fit, widths=list(widths))
    with runtime(seed=config.seed):  # the seed alone picks the student's initial weights
        student = build("cnn", **args)
    student.info = classify.model_info(fit, "cnn", args)
    student.info.preprocess["dataset"] = teacher.info.preprocess["dataset"]
    teacher.eval().requires_grad_(False)
    with classify.single_view(teacher):
        return finetune(student, fit, val, config, progress, loss=distillation_loss(teacher, config))


def distillation_loss(teacher, config: CompressConfig):
    import torch
    import torch.nn.functional as F

    t, alpha = config.temperature, config.alpha

    def loss(student, x, y):
        with torch.no_grad():
            soft_targets = F.log_softmax(teacher(x).float() / t, 1)
        logits = student(x).float()
        soft = F.kl_div(F.log_softmax(logits / t, 1), soft_targets, log_target=True, reduction="batchmean")
        return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(logits, y)

    return loss


def _int8(source, path, out, data, data_dir, config, start, progress, aware: bool):
    """Quantize with activation ranges calibrated on `config.calibration` training images, each prepared as the
    task's prediction prepares its input (classifier images, segmentation tiles at the model's scale, letterboxed
    detector inputs). `aware`: first fine-tune a classifier through simulated int8 rounding (FakeInt8)."""
    import torch

    import ocula
    from ocula.compression.quantize import quantize_int8, simulate_int8, strip_simulation
    from ocula.tasks import classify

    module, val, epoch_seconds = copy.deepcopy(source.module), None, None
    if source.info.task == "classify":  # calibrate on the images left after the hold-out, then score the hold-out
        data, val = classify.split_validation(classify.load_data(data, "train", data_dir), config.val_fraction,
                                              config.seed)
    if aware:
        module, epoch_seconds = finetune(simulate_int8(module), data, val, config, progress)
        strip_simulation(module)
    inputs = source.task.calibration_inputs(module, data, data_dir, config.calibration, config.seed)
    quantize_int8(module.cpu(), inputs, out)
    seconds = time.perf_counter() - start
    result = ocula.load(out, device="cpu")
    before = flops(source.module, torch.from_numpy(inputs[0][:1]))
    val_accuracy = classify.evaluate(result.module, val)["accuracy"] if val is not None else None
    result.summary = _summary("qat" if aware else "int8", path, out, config, seconds, before, before,
                              epoch_seconds=epoch_seconds, val_accuracy=val_accuracy)
    return result


def _amount(method: str, config: CompressConfig) -> float:
    amount = AMOUNT[method] if config.amount is None else config.amount
    if not 0 < amount < 1:
        raise OculaError(f"{method}: amount must be between 0 and 1, not {amount}")
    return amount


_METHOD = {"magnitude": _magnitude, "structured": _structured, "distill": _distill,
           "tucker": _lowrank("tucker"), "cp": _lowrank("cp"), "bwn": _binary(False), "xnor": _binary(True)}
