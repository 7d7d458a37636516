"""The fast CIFAR-10 recipe (airbench): whitening init, the network and its test-time views, the augmentation, the
lookahead, and the recipe end to end through the API, all on tiny synthetic data."""

import pytest
import torch
import torch.nn.functional as F

import ocula
from ocula.engine.batches import FlipTranslateBatches
from ocula.engine.trainer import Trainer
from ocula.modelfile import ModelInfo
from ocula.models import build
from ocula.models.airbench import whitening_filters
from ocula.tasks import classify

import synthetic


def correlated_images(n=64, size=12, seed=0):
    """Images whose neighbouring pixels and channels are strongly correlated, like photos."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.rand(n, 1, size + 3, size + 3, generator=g), 4, stride=1)
    return base * torch.tensor([1.0, 0.8, 0.5])[:, None, None] + 0.05 * torch.rand(n, 3, size, size, generator=g)


def patch_moments(y):
    flat = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()
    return flat.mean(0), torch.cov(flat.T)


def test_whitening_filters_make_patches_zero_mean_with_identity_covariance():
    x = correlated_images()
    _, before = patch_moments(F.unfold(x, 2).reshape(len(x), 12, 11, 11))
    correlation = before / before.diagonal().sqrt().outer(before.diagonal().sqrt())
    assert correlation.min() > 0.4  # raw patches: every pixel and channel goes with the others
    w, b = whitening_filters(x, 2, eps=0.0)
    assert w.shape == (12, 3, 2, 2) and b.shape == (12,)
    mean, cov = patch_moments(F.conv2d(x, w, b))
    assert mean.abs().max() < 1e-4
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=2e-3)


def test_model_whitening_layer_holds_filters_and_their_negatives():
    model = build("airbench", widths=[8, 16, 16], value_max=1.0, mean=[0.5] * 3, std=[0.25] * 3)
    x = correlated_images(n=32, size=16)
    model.init_from_data(x)
    w = model.whiten.weight
    assert torch.equal(w[:12], -w[12:]) and not model.whiten.weight.requires_grad
    z = model.normalize(x)
    mean, cov = patch_moments(F.conv2d(z, w[:12], model.whiten.bias[:12]))
    assert mean.abs().max() < 1e-3
    # eps (5e-4) damps each direction by eigenvalue / (eigenvalue + eps), the weak ones most; no correlation is left
    _, raw = patch_moments(F.unfold(z, 2).reshape(len(z), 12, 15, 15))
    eigenvalues = torch.linalg.eigvalsh(raw).flip(0)
    assert torch.allclose(cov, torch.diag(eigenvalues / (eigenvalues + 5e-4)), atol=2e-3)


def test_test_time_views_average_mirrors_and_shifts():
    model = build("airbench", widths=[4, 8, 8], tta=2).eval()
    x = torch.rand(3, 3, 16, 16) * 255
    plain = model.logits(x)
    mirrored = 0.5 * (plain + model.logits(x.flip(3)))
    model.tta = 1
    assert torch.allclose(model(x), mirrored, atol=1e-6)
    model.tta = 2
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [padded[:, :, :16, :16], padded[:, :, 2:, 2:]]
    shifted = sum(0.5 * (model.logits(v) + model.logits(v.flip(3))) for v in views) / 2
    assert torch.allclose(model(x), 0.5 * mirrored + 0.5 * shifted, atol=1e-6)
    with classify.single_view(model):
        assert torch.allclose(model(x), plain, atol=1e-6)
    assert model.tta == 2


def test_flip_translate_batches_alternate_mirrors_and_shift_within_bounds():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    x = x.repeat(8, 1, 1, 1)  # 16 images, each row of each channel different
    plain = FlipTranslateBatches(x, torch.zeros(16, dtype=torch.long), 16, translate=0, seed=1, shuffle=False)
    even = next(plain(torch.Generator().manual_seed(0)))[0]
    plain.set_epoch(1)
    odd = next(plain(torch.Generator().manual_seed(0)))[0]
    mirrored = (even == x.flip(3)).flatten(1).all(1)
    assert torch.equal(mirrored, plain.mirrored) and 0 < mirrored.sum() < 16
    assert torch.equal(torch.where(mirrored[:, None, None, None], x, x.flip(3)), odd)  # the other way next epoch
    shifted = FlipTranslateBatches(x, torch.zeros(16, dtype=torch.long), 16, translate=2, seed=1, shuffle=False)
    out = next(shifted(torch.Generator().manual_seed(0)))[0]
    padded = F.pad(torch.where(mirrored[:, None, None, None], x.flip(3), x), (2, 2, 2, 2), mode="reflect")
    for i in range(16):  # each output is one 8x8 window of its padded (mirrored) image
        windows = padded[i].unfold(1, 8, 1).unfold(2, 8, 1)  # [3, 5, 5, 8, 8]
        assert (windows == out[i][:, None, None]).flatten(3).all(3).all(0).any()


def test_airbench_trains_a_few_steps_on_synthetic_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=g)
    x = torch.rand(64, 3, 16, 16, generator=g) * 100 + labels[:, None, None, None] * 100.0  # bright or dark
    model = build("airbench", num_classes=2, widths=[8, 16, 16], mean=[0.4] * 3, std=[0.25] * 3)
    model.init_from_data(x)
    config = classify.default_config("airbench", epochs=10, batch_size=16, lr=0.2, threads=1, bf16=False,
                                     channels_last=False)  # 6 epochs left 1 in 20 weight seeds below 0.9, 10 none of 30
    batches = FlipTranslateBatches(x, labels, 16, drop_last=True)
    before = [p.detach().clone() for p in model.parameters()]
    info = ModelInfo(task="classify", arch="airbench", args={}, classes=["0", "1"])
    trainer = Trainer(model, config, loss_fn=lambda m, a, b: F.cross_entropy(m(a), b, label_smoothing=0.2),
                      train_batches=batches, info=info, progress=False)
    history = trainer.fit()
    assert len(trainer.optimizer.param_groups) == 2  # BN biases learn 64x faster
    assert trainer.optimizer.param_groups[1]["initial_lr"] == pytest.approx(0.2 * 64 / 5)
    assert history[-1]["loss"] < history[0]["loss"]
    assert torch.equal(before[0], model.whiten.weight)  # the whitening filters stay as the data made them
    assert (model.eval()(x).argmax(1) == labels).float().mean() > 0.9
    lookahead = trainer.callbacks[-1]
    assert all(torch.equal(lookahead.slow[k], v) for k, v in model.state_dict().items() if k in lookahead.slow)


def test_recipe_trains_resumes_and_exports_through_the_api(tmp_path):
    data = synthetic.class_folder(tmp_path / "data", per_class=12, size=16)
    settings = dict(runs_dir=tmp_path / "runs", progress=False, threads=1, batch_size=8, widths=[4, 8, 8], lr=0.2)
    model = ocula.train(data, "airbench", epochs=2, **settings)
    config = (model.run_dir / "config.json").read_text()
    assert '"schedule": "triangle"' in config and '"lookahead": 5' in config
    assert model.info.arch == "airbench" and model.module.tta == 2
    longer = ocula.train(data, "airbench", epochs=3, resume=True, **settings)
    assert len(list(open(longer.run_dir / "metrics.csv"))) == 4
    loaded = ocula.load(longer.path, device="cpu")
    assert loaded.evaluate()["accuracy"] == longer.summary["test_accuracy"]
    assert "max abs difference" in loaded.export("onnx")
