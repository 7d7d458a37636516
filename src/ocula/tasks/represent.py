"""Representation learning: the task protocol (see `ocula.tasks`) for learning codes of images without labels.

The autoencoder family of 003_bee4354d1f11b422.txt (shallow under- and overcomplete, deep, tied, sparse,
contractive, denoising, convolutional with transposed-convolution or unpooling decoders), the VAE (MLP and conv,
Bernoulli or Gaussian likelihood, KL warm-up), DCGAN and PCA, on any image set classification reads (MNIST,
Fashion-MNIST, CIFAR-10, class folders such as Omniglot's). Labels are never used in training; they only colour
the embedding figures. The lecture's snippets are not followed where they are wrong: the reparametrisation here
draws its noise on the model's device (not `torch.cuda.FloatTensor`), the KL term keeps its bracket
(-1/2 sum(1 + log s^2 - mu^2 - s^2)), and the plain autoencoder encodes before it decodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ocula.data.classification import ImageSet
from ocula.engine.batches import ArrayBatches
from ocula.engine.callbacks import Callback
from ocula.engine.device import device_of, fork_rng, runtime
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.errors import OculaError
from ocula.fileio import write_json
from ocula.modelfile import ModelInfo
from ocula.models import build
from ocula.models.autoencoders import DCGAN
# load_data and show are classification's: the same image sets, drawn the same way
from ocula.tasks.classify import (CNN_WIDTHS, DATASET_WIDTHS, PHOTO_STYLES, _stats, load_data, prepare,  # noqa: F401
                                  show, split_validation, to_tensor)

# model name -> (architecture, its arguments beyond the data's, the loss that trains it)
RECIPES = {
    "ae": ("mlp-autoencoder", dict(hidden=[128, 64, 12], code_size=3), "mse"),  # the lecture's 784-128-64-12-3
    "shallow-ae": ("mlp-autoencoder", dict(hidden=[], code_size=32), "mse"),
    "overcomplete-ae": ("mlp-autoencoder", dict(hidden=[], code_size=1024, code_activation="sigmoid"), "sparse"),
    "tied-ae": ("mlp-autoencoder", dict(hidden=[128, 64, 12], code_size=3, tied=True), "mse"),
    "sparse-ae": ("mlp-autoencoder", dict(hidden=[], code_size=256, code_activation="sigmoid"), "sparse"),
    "contractive-ae": ("mlp-autoencoder", dict(hidden=[], code_size=64, code_activation="sigmoid"), "contractive"),
    "denoising-ae": ("conv-autoencoder", dict(code_size=32), "denoise"),
    "conv-ae": ("conv-autoencoder", dict(code_size=32), "mse"),
    "conv-ae-unpool": ("conv-autoencoder", dict(code_size=32, decoder="unpool"), "mse"),
    "vae": ("mlp-autoencoder", dict(hidden=[400], code_size=20, variational=True), "elbo"),  # Kingma & Welling
    "conv-vae": ("conv-autoencoder", dict(code_size=20, variational=True), "elbo"),
    "dcgan": ("dcgan", dict(code_size=64, widths=[32, 64]), "gan"),
    "pca": ("pca", dict(code_size=32), "pca"),
}
MODELS = tuple(RECIPES)
# penalty: weight of the sparsity / contractive term, or the VAE's KL weight (beta) after warm-up.
# noise_level: the corruption's strength on the 0..1 scale (Gaussian sigma, or the share of pixels masked or
# salted). iw_samples: importance samples of the VAE's log-likelihood estimate. feature_model: an ocula classifier
# of the same data whose penultimate features score samples (the Frechet distance).
OPTIONS = dict(val_fraction=0.1, code_size=None, widths=None, penalty=None, sparsity="l1", rho=0.05,
               noise="gaussian", noise_level=0.5, likelihood="bernoulli", kl_warmup=0, binarize=False,
               iw_samples=5000, feature_model=None)
PENALTY = {"sparse": {"l1": 0.01, "kl": 0.1}, "contractive": 0.1, "elbo": 1.0}
NOISES = ("gaussian", "masking", "salt-pepper")
IW_IMAGES = 1000  # test images the importance-weighted NLL averages over (5000 decoder passes each)
BINARIZE_SEED = 0  # the test set's one dynamic binarization, so every evaluation sees the same bits
VAL_FRECHET_N = 2000  # samples and validation images behind a GAN's per-epoch Frechet distance


# --- losses ----------------------------------------------------------------------------------------------------
def corrupt(u: torch.Tensor, kind: str, level: float) -> torch.Tensor:
    """A corrupted copy of 0..1 images for a denoising autoencoder (torch's global RNG, on u's device)."""
    if kind == "gaussian":
        return (u + level * torch.randn_like(u)).clamp(0, 1)
    hit = torch.rand_like(u) < level
    if kind == "masking":
        return u.masked_fill(hit, 0.0)
    if kind == "salt-pepper":
        return torch.where(hit, (torch.rand_like(u) < 0.5).to(u.dtype), u)
    raise OculaError(f"unknown noise {kind!r}; choose {', '.join(NOISES)}")


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, s^2) || N(0, 1)) per image, summed over the code: -1/2 sum(1 + log s^2 - mu^2 - s^2)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)


def reconstruction_nll(model, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) per image, summed over pixels (0..1 targets): Bernoulli on the decoder's logits, or Gaussian
    around its sigmoid mean with the model's learned scale."""
    raw = raw.float()
    if model.likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(raw, target, reduction="none").flatten(1).sum(1)
    log_s = model.log_scale.float()
    z = (target - torch.sigmoid(raw)) * torch.exp(-log_s)
    return (0.5 * z.pow(2) + log_s + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def losses(model, x: torch.Tensor, kind: str, opts: dict, beta: float = 1.0) -> dict:
    """The training objective `loss` (mean per image) and what is logged beside it, for native-range images."""
    u = x.float() / model.value_max
    if kind == "elbo":
        target = torch.bernoulli(u) if opts["binarize"] else u
        mu, logvar = model.posterior(target * model.value_max)
        mu, logvar = mu.float(), logvar.float()
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # the reparametrisation trick
        nll, kl = reconstruction_nll(model, model._decode(z), target), kl_divergence(mu, logvar)
        return {"loss": (nll + beta * kl).mean(), "elbo_loss": (nll + kl).mean(), "kl": kl.mean()}
    penalty = opts["penalty"]
    if kind == "sparse":
        code = model.encode(x).float()
        out = model.decode_unit(code).float()
        if opts["sparsity"] == "l1":
            extra = code.abs().sum(1)
        else:  # KL from the target activation rho to each unit's mean activation over the batch
            rho, rho_hat = opts["rho"], code.mean(0).clamp(1e-6, 1 - 1e-6)
            extra = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
    else:
        source = corrupt(u, opts["noise"], opts["noise_level"]) * model.value_max if kind == "denoise" else x
        out = model(source).float() / model.value_max
        extra = model.contractive_penalty(x).float() if kind == "contractive" else 0.0
    sse = (out - u).pow(2).flatten(1).sum(1)
    return {"loss": (sse + penalty * extra).mean(), "mse": sse.mean() / u[0].numel()}


class KLWarmup(Callback):
    """The VAE's KL weight rises linearly from 0 to `beta` over the first `epochs` epochs (Bowman et al.), so
    the decoder learns to use the code before the prior pulls it in."""

    def __init__(self, beta: float, steps: int):
        self.target, self.steps, self.done = beta, max(steps, 1), 0

    @property
    def beta(self) -> float:
        return self.target * min(1.0, self.done / self.steps)

    def on_batch_end(self, trainer, loss):
        self.done += 1

    def state_dict(self):
        return {"done": self.done}

    def load_state_dict(self, state):
        self.done = state["done"]


# --- building and training -------------------------------------------------------------------------------------
def settings(model_name: str, data: ImageSet, options: dict, dataset: str) -> tuple[str, dict, str, dict]:
    """(architecture, its arguments, loss kind, loss options) for a model name on a dataset."""
    arch, args, kind = RECIPES[model_name]
    args = {**args, "input_size": list(data.images.shape[1:3]), "in_channels": data.channels,
            "value_max": data.value_max}
    if options["code_size"]:
        args["code_size"] = options["code_size"]
    if arch == "conv-autoencoder":
        mean, std = _stats(data)  # the classifier's statistics, so the encoder initialises a cnn exactly
        args.update(mean=mean, std=std, widths=options["widths"] or DATASET_WIDTHS.get(dataset, CNN_WIDTHS))
    elif options["widths"]:
        args["widths" if arch == "dcgan" else "hidden"] = options["widths"]
    if args.get("variational"):
        args["likelihood"] = options["likelihood"]
    if options["noise"] not in NOISES:
        raise OculaError(f"unknown noise {options['noise']!r}; choose {', '.join(NOISES)}")
    if options["sparsity"] not in ("l1", "kl"):
        raise OculaError(f"sparsity is l1 or kl, not {options['sparsity']!r}")
    penalty = options["penalty"]
    if penalty is None:
        default = PENALTY.get(kind, 0.0)
        penalty = default[options["sparsity"]] if isinstance(default, dict) else default
    loss = {k: options[k] for k in ("sparsity", "rho", "noise", "noise_level", "binarize", "kl_warmup",
                                    "iw_samples", "feature_model")}
    return arch, args, kind, {**loss, "penalty": penalty}


def model_info(data: ImageSet, arch: str, args: dict, model_name: str, kind: str, loss: dict,
               dataset: str) -> ModelInfo:
    h, w = data.images.shape[1:3]
    return ModelInfo(task="represent", arch=arch, args=args, classes=list(data.classes),
                     preprocess={"input_size": [h, w], "channels": data.channels, "value_max": data.value_max,
                                 "style": PHOTO_STYLES.get(data.name, "resize"), "dataset": dataset},
                     extra={"model": model_name, "loss": kind, **loss})


def fit_autoencoder(model, info: ModelInfo, train: ImageSet, val: ImageSet | None, config: TrainConfig, *,
                    run_dir: Path, resume, progress: bool):
    """Train with the shared engine (checkpoints, resume, NaN stop, CSV log); returns (best model, history)."""
    kind, opts = info.extra["loss"], info.extra
    batches = ArrayBatches(to_tensor(train.images), torch.from_numpy(train.labels), config.batch_size,
                           drop_last=len(train) > config.batch_size)
    warmup = KLWarmup(opts["penalty"], opts["kl_warmup"] * len(batches)) if kind == "elbo" else None

    def loss_fn(m, x, y):
        return losses(m, x, kind, opts, beta=warmup.beta if warmup and opts["kl_warmup"] else opts["penalty"])[
            "loss"]

    evaluate_fn = None
    if val is not None:
        vx = to_tensor(val.images)

        def evaluate_fn(m):
            return mean_losses(m, vx, kind, opts)

    trainer = Trainer(model, config, loss_fn=loss_fn, train_batches=batches, evaluate_fn=evaluate_fn, info=info,
                      run_dir=run_dir, progress=progress)
    if warmup:
        trainer.callbacks.append(warmup)
    history = trainer.fit(resume=resume)
    if val is not None and (run_dir / "best.ocula").is_file():
        from ocula.modelfile import load_model

        return load_model(run_dir / "best.ocula", device=config.device), history
    return trainer.kept_model, history


@torch.no_grad()
def mean_losses(model, x: torch.Tensor, kind: str, opts: dict, batch_size: int = 1000) -> dict:
    """`losses` averaged over a CPU set of native-range images, in eval mode on the model's device (the true
    objective: KL weight 1 for a VAE, the penalty's own weight otherwise)."""
    model.eval()
    device, sums = device_of(model), {}
    for i in range(0, len(x), batch_size):
        batch = x[i:i + batch_size].to(device)
        for k, v in losses(model, batch, kind, opts).items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(batch)
    return {k: v / len(x) for k, v in sums.items()}


def train_gan(model, info: ModelInfo, train: ImageSet, val: ImageSet | None, config: TrainConfig, *,
              run_dir: Path, progress: bool):
    """DCGAN's two-player loop: Adam (beta1 0.5) for each network, the non-saturating generator loss, one-sided
    label smoothing (real = 0.9) against an overconfident discriminator. A non-finite loss ends the run. With a
    feature model and a validation set, the epoch whose samples lie nearest the validation images (Frechet
    distance) is kept: a GAN's losses say nothing of its samples, and later epochs can get worse."""
    import copy
    from types import SimpleNamespace

    from ocula.engine.callbacks import CSVLogger
    from ocula.engine.device import resolve_device

    device = resolve_device(config.device)
    batches = ArrayBatches(to_tensor(train.images), torch.from_numpy(train.labels), config.batch_size,
                           drop_last=len(train) > config.batch_size)
    history, log = [], CSVLogger(run_dir / "metrics.csv")
    feature_model = info.extra.get("feature_model")
    best, best_state = {"val_frechet": float("inf")}, None
    with runtime(seed=config.seed, threads=config.threads, device=device):
        model.to(device).train()
        if feature_model and val is not None:
            n_val = min(len(val), VAL_FRECHET_N)
            val_f, _ = classifier_features(feature_model, val.images[:n_val], device)
        adam = dict(lr=config.lr, betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(model.generator.parameters(), **adam)
        opt_d = torch.optim.Adam(model.discriminator.parameters(), **adam)
        for epoch in range(config.epochs):
            torch.manual_seed(config.seed * 100_003 + epoch)
            g, start, sums, n = torch.Generator().manual_seed(config.seed * 100_003 + epoch), time.perf_counter(), \
                np.zeros(2), 0
            for x, _ in batches(g):
                x = x.to(device)
                fake = model.decode(torch.randn(len(x), model.code_size, device=device))
                real_logit, fake_logit = model.discriminate(x), model.discriminate(fake.detach())
                loss_d = (F.binary_cross_entropy_with_logits(real_logit, torch.full_like(real_logit, 0.9)) +
                          F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit)))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                fake_logit = model.discriminate(fake)
                loss_g = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                values = np.array([loss_d.item(), loss_g.item()])
                if not np.isfinite(values).all():
                    raise OculaError(f"GAN loss became {values.tolist()} (discriminator, generator) at epoch "
                                     f"{epoch + 1}; training stopped (try a lower --lr)")
                sums, n = sums + values * len(x), n + len(x)
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "loss_d": sums[0] / n, "loss_g": sums[1] / n,
                            "train_seconds": seconds, "images_per_second": n / seconds})
            if feature_model and val is not None:
                fake_f, _ = classifier_features(feature_model, sample(model, n_val, seed=1), device)
                history[-1]["val_frechet"] = frechet_distance(fake_f, val_f)
                if history[-1]["val_frechet"] < best["val_frechet"]:
                    best, best_state = history[-1], copy.deepcopy(model.state_dict())
                model.train()
            log.on_epoch_end(SimpleNamespace(history=history), history[-1])
            if progress:
                print(f"epoch {epoch + 1}/{config.epochs}: discriminator {sums[0] / n:.4f}, generator "
                      f"{sums[1] / n:.4f}, {n / seconds:.0f} images/s"
                      + (f", val Frechet {history[-1]['val_frechet']:.2f}" if "val_frechet" in history[-1] else ""),
                      flush=True)
    if best_state is not None:
        model.load_state_dict(best_state)
        info.metrics.update(val_frechet=best["val_frechet"], val_best_epoch=best["epoch"])
    return model.eval(), history


# --- metrics ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def reconstruct(model, images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Native-range reconstructions of a native-range image stack (same layout as given)."""
    from ocula.tasks.classify import batched_forward

    out = batched_forward(model, to_tensor(images), batch_size)
    return out.squeeze(1).numpy() if images.ndim == 3 else out.permute(0, 2, 3, 1).numpy()


def binarized(images: np.ndarray, value_max: float, seed: int = BINARIZE_SEED) -> np.ndarray:
    """Dynamic binarization (each pixel on with probability intensity / value_max), drawn once with `seed`, in the
    native range (0 or value_max)."""
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape) < images / value_max).astype(np.float32) * value_max


@torch.no_grad()
def importance_weighted_nll(model, images: np.ndarray, k: int = 5000, chunk: int = 25_000) -> np.ndarray:
    """-log p(x) per image in nats, estimated with k importance samples from q(z|x) (Burda et al. 2016):
    log mean_k p(x|z_k) p(z_k) / q(z_k|x). Bernoulli likelihood, images in the native range (binarized)."""
    model.eval().to(memory_format=torch.channels_last)  # conv decoders run ~1.9x faster so on CPU, same math
    device, out = device_of(model), []
    for x in to_tensor(images):
        x = x[None].to(device)
        mu, logvar = (t.float() for t in model.posterior(x))
        std, target, weights = torch.exp(0.5 * logvar), x / model.value_max, []
        for start in range(0, k, chunk):
            eps = torch.randn(min(chunk, k - start), mu.shape[1], device=device)
            z = mu + std * eps
            log_q = (-0.5 * eps.pow(2) - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(1)
            log_p = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(1)
            nll = reconstruction_nll(model, model._decode(z), target.expand(len(z), *target.shape[1:]))
            weights.append(log_p - log_q - nll)
        w = torch.cat(weights)
        out.append(float(math.log(k) - torch.logsumexp(w, 0)))
    model.to(memory_format=torch.contiguous_format)
    return np.array(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) between two feature sets (FID's formula)."""
    from scipy import linalg

    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def classifier_features(path: str | Path, images: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, predicted classes) of native-range images under an ocula classifier file."""
    from ocula.modelfile import load_model
    from ocula.tasks.classify import batched_forward
    from ocula.tasks.embed import embed

    classifier = load_model(path, device=device)
    if classifier.info.task != "classify":
        raise OculaError(f"the feature model must be a classifier, not a {classifier.info.task} model", path)
    logits = batched_forward(classifier, to_tensor(images))
    return embed(classifier, images), logits.argmax(1).numpy()


def psnr(clean: np.ndarray, other: np.ndarray, value_max: float) -> float:
    """Peak signal-to-noise ratio in dB over the whole set (one MSE, as for a batch of test images)."""
    mse = float(np.mean((clean.astype(np.float64) / value_max - other.astype(np.float64) / value_max) ** 2))
    return 10 * math.log10(1 / mse)


def corrupted(model, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Test images corrupted the way a denoising model was trained (seeded), native range."""
    with fork_rng():
        torch.manual_seed(seed)
        u = to_tensor(images) / model.value_max
        noisy = corrupt(u, model.info.extra["noise"], model.info.extra["noise_level"]) * model.value_max
    return noisy.squeeze(1).numpy() if images.ndim == 3 else noisy.permute(0, 2, 3, 1).numpy()


def evaluate(model, data: ImageSet, out_dir: Path | None = None, *, frechet_n: int = 10_000) -> dict:
    """Reconstruction MSE per pixel (0..1 scale); a VAE's test ELBO loss and IW-NLL on dynamically binarized
    images; a denoiser's PSNR; a sampler's Frechet distance in the feature model's space beside the real-vs-real
    floor (train vs test). With `out_dir`, eval.json and the figures."""
    _check_fits(model, data)
    extra, result = model.info.extra, {"n": len(data)}
    if not is_gan(model):
        result["mse"] = float(np.mean((reconstruct(model, data.images) / data.value_max -
                                       data.images / data.value_max) ** 2))
    if getattr(model, "variational", False):
        shown = binarized(data.images, data.value_max) if extra["binarize"] else data.images
        result["elbo_loss"] = mean_losses(model, to_tensor(shown), "elbo", extra)["elbo_loss"]
        if model.likelihood == "bernoulli":
            n = min(len(data), IW_IMAGES)
            with fork_rng():
                torch.manual_seed(0)
                nll = importance_weighted_nll(model, binarized(data.images[:n], data.value_max), extra["iw_samples"])
            result.update(iw_nll=float(nll.mean()), iw_images=n, iw_samples=extra["iw_samples"],
                          binarization=f"dynamic: pixel ~ Bernoulli(value / {data.value_max:g}), seed {BINARIZE_SEED}")
    if extra["loss"] == "denoise":
        noisy = corrupted(model, data.images)
        result.update(noise=extra["noise"], noise_level=extra["noise_level"],
                      psnr_noisy=psnr(data.images, noisy, data.value_max),
                      psnr_denoised=psnr(data.images, reconstruct(model, noisy), data.value_max))
    if extra.get("feature_model") and generative(model):
        result.update(sample_quality(model, data, extra["feature_model"], frechet_n))
    if out_dir is not None:
        write_json(Path(out_dir) / "eval.json", result)
        draw_figures(model, data, Path(out_dir))
    return result


def sample_quality(model, test: ImageSet, feature_model: str, n: int) -> dict:
    """Frechet distance of n samples to the test set, the floor (n training images to the test set), and how the
    classifier spreads the samples over the classes (a collapsed generator covers few)."""
    device = device_of(model)
    train = load_data(model.info.preprocess["dataset"], "train")
    n = min(n, len(test), len(train))
    rng = np.random.default_rng(0)
    real = train.images[rng.choice(len(train), n, replace=False)]
    fake = sample(model, n, seed=0)
    test_f, _ = classifier_features(feature_model, test.images[:n], device)
    real_f, _ = classifier_features(feature_model, real, device)
    fake_f, fake_cls = classifier_features(feature_model, fake.astype(np.float32), device)
    shares = np.bincount(fake_cls, minlength=len(test.classes)) / n
    return {"frechet": frechet_distance(fake_f, test_f), "frechet_floor": frechet_distance(real_f, test_f),
            "frechet_n": n, "sample_class_shares": [round(float(s), 4) for s in shares]}


def _check_fits(model, data: ImageSet) -> None:
    pre = model.info.preprocess
    shape = [*data.images.shape[1:3], data.channels]
    if shape != [*pre["input_size"], pre["channels"]]:
        raise OculaError(f"dataset {data.name} ({'x'.join(map(str, shape))}) does not fit the model "
                         f"({pre['input_size'][0]}x{pre['input_size'][1]}x{pre['channels']})")


# --- sampling --------------------------------------------------------------------------------------------------
def is_gan(model) -> bool:
    return isinstance(model, DCGAN)


def generative(model) -> bool:
    """Whether the model has a prior to sample codes from (VAEs and GANs)."""
    return is_gan(model) or getattr(model, "variational", False)


@torch.no_grad()
def sample(model, n: int = 64, *, seed: int = 0, between: list[np.ndarray] | None = None,
           steps: int = 10) -> np.ndarray:
    """n images decoded from codes drawn from N(0, I) (VAE, GAN), or with `between` (two images) the decoded
    straight line between their codes in `steps` steps. Native range, [n, H, W] or [n, H, W, C]."""
    device = device_of(model)
    model.eval()
    if between is not None:
        if not hasattr(model, "encode") or getattr(model, "unpool", False):
            raise OculaError(f"a {model.info.extra['model']} cannot interpolate: it needs an encoder and a decoder "
                             "that decodes a code alone")
        pre = model.info.preprocess
        pair = torch.from_numpy(np.stack([prepare(im, pre)[0] for im in between])).to(device)
        a, b = model.encode(pair).float()
        t = torch.linspace(0, 1, steps, device=device)[:, None]
        z = (1 - t) * a + t * b
    else:
        if not generative(model):
            raise OculaError(f"a {model.info.extra['model']} has no prior to sample from; use vae, conv-vae or "
                             "dcgan (any autoencoder can --interpolate)")
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, model.code_size, generator=g).to(device)
    images = torch.cat([model.decode(z[i:i + 1000]).float().cpu() for i in range(0, len(z), 1000)])
    return images.squeeze(1).numpy() if images.shape[1] == 1 else images.permute(0, 2, 3, 1).numpy()


# --- figures ---------------------------------------------------------------------------------------------------
def draw_figures(model, data: ImageSet, out_dir: Path, history: list[dict] | None = None) -> list[Path]:
    """Reconstructions, samples, the 2-D embedding coloured by the labels training never saw, an interpolation
    strip, denoising before / after and the loss curves, as PNGs in `out_dir`."""
    from ocula.plots import image_grid

    out, vm, shown = [], data.value_max, data.images[:8]
    if not is_gan(model):
        recon = reconstruct(model, shown)
        out.append(image_grid(np.concatenate([shown, recon]), ["input"] * len(shown) + ["reconstruction"] *
                              len(shown), out_dir / "reconstructions.png", value_max=vm,
                              title=f"{model.info.extra['model']}: inputs and reconstructions"))
        out.append(plot_embedding(embed_codes(model, data), data, out_dir / "embedding.png",
                                  model.info.extra["model"]))
    if generative(model):
        out.append(image_grid(sample(model, 32), [""] * 32, out_dir / "samples.png", value_max=vm,
                              title=f"{model.info.extra['model']}: samples from the prior"))
    if not is_gan(model) and not getattr(model, "unpool", False):
        other = np.flatnonzero(data.labels != data.labels[0])  # from the first image to one of another class
        strip = sample(model, between=[data.images[0], data.images[other[0] if len(other) else -1]], steps=10)
        out.append(image_grid(strip, [""] * len(strip), out_dir / "interpolation.png", value_max=vm, cols=10,
                              title="decoded codes on the line between two images"))
    if model.info.extra["loss"] == "denoise":
        noisy, extra = corrupted(model, shown), model.info.extra
        out.append(image_grid(np.concatenate([shown, noisy, reconstruct(model, noisy)]),
                              ["clean"] * 8 + ["noisy"] * 8 + ["denoised"] * 8, out_dir / "denoising.png",
                              value_max=vm, title=f"{extra['noise']} noise {extra['noise_level']}"))
    if history:
        out.append(plot_history(history, out_dir / "loss.png"))
    return out


def embed_codes(model, data: ImageSet, n: int = 3000) -> np.ndarray:
    from ocula.tasks.embed import embed

    return embed(model, data.images[:n])


def plot_embedding(codes: np.ndarray, data: ImageSet, path: Path, title: str) -> Path:
    """A 2-D code as it is, a wider one by its first two principal components, coloured by the unused labels."""
    from ocula.plots import pyplot, save_figure

    plt = pyplot()
    xy, how = codes[:, :2], "code"
    if codes.shape[1] > 2:
        centred = codes - codes.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy, how = centred @ vt[:2].T, f"PCA of the {codes.shape[1]}-d code"
    labels = data.labels[:len(codes)]
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, vmin=-0.5, vmax=9.5)
    if len(data.classes) <= 10:
        cbar = fig.colorbar(points, ticks=range(len(data.classes)))
        cbar.ax.set_yticklabels(data.classes)
    ax.set_title(f"{title}: {how}, coloured by labels training never saw", fontsize=9)
    return save_figure(fig, path)


def plot_history(history: list[dict], path: Path) -> Path:
    from ocula.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in sorted({k for h in history for k in h if k.startswith(("loss", "val_loss"))}):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per image")
    ax.legend()
    return save_figure(fig, path)


# --- the task protocol -----------------------------------------------------------------------------------------
def default_config(model_name: str, **overrides) -> TrainConfig:
    if model_name not in MODELS:
        raise OculaError(f"unknown representation model {model_name!r}; choose one of {', '.join(MODELS)}")
    arch, _, kind = RECIPES[model_name]
    # Conv models: bf16 autocast + channels-last (as for the classifiers); MLPs are too small to gain from it.
    fast = dict(bf16=True, channels_last=True) if arch == "conv-autoencoder" else {}
    gan = dict(lr=2e-4, epochs=5) if kind == "gan" else {}
    return TrainConfig(**{"monitor": "val_loss", "mode": "min", "epochs": 10, "lr": 2e-3, "weight_decay": 0.0,
                          **fast, **gan, **overrides})


def train(data: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None, resume=False,
          progress: bool = True, **options):
    """Fit on the train split without its labels, select on val (the dataset's own, else `val_fraction` of
    train), score the test split once when there is one, and draw the figures into the run folder."""
    from ocula.data.layout import splits

    options = {**OPTIONS, **options}
    have = splits(data, data_dir)
    train_set = load_data(data, "train", data_dir)
    fit_set, val_set = ((train_set, load_data(data, "val", data_dir, train_set.images.shape[1:3]))
                        if "val" in have else split_validation(train_set, options["val_fraction"], config.seed))
    arch, args, kind, loss = settings(model_name, fit_set, options, data)
    info = model_info(fit_set, arch, args, model_name, kind, loss, data)
    with runtime(seed=config.seed):
        model = build(arch, **args)
    model.info = info
    history = []
    if kind == "pca":
        model.fit(to_tensor(fit_set.images))
    elif kind == "gan":
        if resume:
            raise OculaError("a dcgan run cannot resume (its two-optimizer loop keeps no checkpoint); start anew",
                             run_dir)
        model, history = train_gan(model, info, fit_set, val_set, config, run_dir=run_dir, progress=progress)
    else:
        model, history = fit_autoencoder(model, info, fit_set, val_set, config, run_dir=run_dir, resume=resume,
                                         progress=progress)
    model.info = info
    summary = {}
    scored = load_data(data, "test", data_dir, train_set.images.shape[1:3]) if "test" in have else val_set
    if scored is not None:
        result = evaluate(model, scored)
        prefix = "test_" if "test" in have else "val_"
        summary = {prefix + k: v for k, v in result.items() if isinstance(v, float) and k != "noise_level"}
        write_json(run_dir / f"{prefix}eval.json", result)
    draw_figures(model, scored if scored is not None else fit_set, run_dir, history)
    info.metrics = {**{k: v for k, v in info.metrics.items() if k.startswith("val_")}, **summary}
    return model, summary


@dataclass
class Representation:
    """One image's code, and for reconstruct / denoise the image the model makes of it (native range)."""

    source: str
    mode: str  # embed | reconstruct | denoise
    code: np.ndarray
    image: np.ndarray
    output: np.ndarray | None
    value_max: float

    @property
    def mse(self) -> float:
        return float(np.mean((self.output / self.value_max - self.image / self.value_max) ** 2))

    def describe(self) -> str:
        if self.mode == "embed":
            return f"{self.source}: code of {len(self.code)} values"
        if self.mode == "reconstruct":
            return f"{self.source}: reconstructed (MSE per pixel {self.mse:.4f})"
        return f"{self.source}: denoised"

    def to_json(self) -> dict:
        out = {"file": self.source, "code": [round(float(v), 5) for v in self.code]}
        return {**out, "mse": round(self.mse, 6)} if self.mode == "reconstruct" else out

    def save(self, out_dir: Path, stem: str) -> dict:
        """STEM-code.npy, and for reconstruct / denoise STEM-MODE.png (the image beside what the model made)."""
        from ocula.fileio import write_npy
        from ocula.plots import image_grid

        saved = {"code_file": str(write_npy(Path(out_dir) / f"{stem}-code.npy", self.code.astype(np.float32)))}
        if self.output is not None:
            titles = ["input", "reconstruction" if self.mode == "reconstruct" else "denoised"]
            saved["picture"] = str(image_grid([self.image, self.output], titles, out_dir / f"{stem}-{self.mode}.png",
                                              value_max=self.value_max, cols=2))
        return saved


MODES = ("embed", "reconstruct", "denoise")


@torch.no_grad()
def predict(model, images: list[np.ndarray], sources: list[str], *, batch_size: int = 256,
            mode: str = "reconstruct") -> list[Representation]:
    """The code of each image (embed), or also its reconstruction, or its denoised version (a denoising model's
    reconstruction of the image as given)."""
    if mode not in MODES:
        raise OculaError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
    if is_gan(model):
        raise OculaError("a dcgan has no encoder: it samples (ocula sample) but cannot embed or reconstruct")
    pre, device = model.info.preprocess, device_of(model)
    x = np.stack([prepare(im, pre, src)[0] for im, src in zip(images, sources)])
    model.eval()
    codes, outputs = [], []
    for i in range(0, len(x), batch_size):
        batch = torch.from_numpy(x[i:i + batch_size]).to(device)
        codes.append(model.encode(batch).float().cpu().numpy())
        if mode != "embed":
            outputs.append(model(batch).float().cpu().numpy())
    codes = np.concatenate(codes)
    outputs = np.concatenate(outputs) if outputs else [None] * len(x)
    hwc = lambda a: a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)  # noqa: E731
    return [Representation(src, mode, c, hwc(im), None if o is None else hwc(o), pre["value_max"])
            for src, c, im, o in zip(sources, codes, x, outputs)]


def export(model, fmt: str, path: Path) -> str:
    """ONNX files of the parts: the encoder (image -> code), the decoder or generator (code -> image) and the
    whole autoencoder (image -> reconstruction), each checked against torch with ONNX Runtime."""
    from ocula.export.onnx import check_parity, export_onnx

    if fmt != "onnx":
        raise OculaError(f"representation models export to ONNX only, not {fmt}")
    path, done = Path(path), []
    parts = []
    if not is_gan(model):
        parts += [(path, model, ("reconstruction",), None), (_sibling(path, "encoder"), Part(model, "encode"),
                                                             ("code",), None)]
    if not getattr(model, "unpool", False):
        name = "generator" if is_gan(model) else "decoder"
        parts.append((_sibling(path, name), Part(model, "decode"), ("image",), torch.randn(2, model.code_size)))
    for file, module, outputs, example in parts:
        module.info = model.info
        out = export_onnx(module, file, outputs=outputs, example=example)
        done.append(f"{out} (max abs difference {check_parity(module, out, example):.2e})")
    return "; ".join(done)


def _sibling(path: Path, part: str) -> Path:
    return path.with_name(f"{path.stem}-{part}{path.suffix}")


class Part(torch.nn.Module):
    """One method of a model (encode, decode) as a module's forward, for export."""

    def __init__(self, model, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x):
        return getattr(self.model, self.method)(x)


def encoder_weights(model, path: str | Path) -> tuple[dict, dict]:
    """A conv autoencoder's (loaded from `path`) `features` state and the cnn arguments that take it unchanged
    (widths, channels, normalisation), to initialise a classifier when labels are scarce."""
    if model.info.arch != "conv-autoencoder":
        raise OculaError(f"--encoder needs a conv autoencoder (conv-ae, denoising-ae, conv-vae), not a "
                         f"{model.info.extra.get('model', model.info.arch)} {model.info.task} model", path)
    a = model.info.args
    state = {k[len("features."):]: v for k, v in model.state_dict().items() if k.startswith("features.")}
    return state, dict(in_channels=a["in_channels"], widths=a["widths"], value_max=a["value_max"], mean=a["mean"],
                       std=a["std"])
