"""Representation learning: every autoencoder kind learns, the maths behind the penalties and metrics is right
(contractive Jacobian, KL term, PCA subspace, transposed-convolution sizes, Frechet distance), and a trained model
embeds, reconstructs, denoises, samples and exports from Python and the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import ocula
from ocula.data.classification import ImageSet
from ocula.errors import OculaError
from ocula.models import build
from ocula.models.autoencoders import MLPAutoencoder, unpool, upsample
from ocula.tasks import represent
from ocula.tasks.classify import pretrained_weights, to_tensor


def blobs(n: int = 64, size: int = 12, channels: int = 1, seed: int = 0) -> ImageSet:
    """Images made of a few random bright squares on black, labelled by where the first square is."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, channels), np.float32)
    labels = np.zeros(n, np.int64)
    for i in range(n):
        for k in range(2):
            y, x = rng.integers(0, size - 4, 2)
            images[i, y:y + 4, x:x + 4] = 255
            if k == 0:
                labels[i] = int(y > size // 2 - 2)
    images = images[..., 0] if channels == 1 else images
    return ImageSet(images, labels, ["top", "bottom"], 255.0, "blobs")


@pytest.mark.parametrize("name", [m for m in represent.MODELS if m not in ("pca", "dcgan")])
def test_each_autoencoder_kind_lowers_its_loss(name):
    data = blobs(channels=3 if name.startswith("conv") else 1)
    arch, args, kind, opts = represent.settings(name, data, dict(represent.OPTIONS), "blobs")
    torch.manual_seed(0)
    model = build(arch, **args)
    x = to_tensor(data.images)

    @torch.no_grad()
    def loss():
        torch.manual_seed(1)  # the same noise draws (denoising, VAE sampling) before and after
        return float(represent.losses(model, x, kind, opts)["loss"])

    before = loss()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(25):
        opt.zero_grad()
        represent.losses(model, x, kind, opts)["loss"].backward()
        opt.step()
    assert loss() < 0.8 * before, name


def test_contractive_penalty_is_the_jacobian_norm_by_finite_differences():
    torch.manual_seed(0)
    model = MLPAutoencoder(input_size=[4, 5], hidden=[], code_size=6, code_activation="sigmoid",
                           value_max=255.0).double()
    x = torch.rand(3, 1, 4, 5, dtype=torch.float64) * 255
    exact = model.contractive_penalty(x)
    eps = 1e-6  # on the 0..1 scale the penalty is defined on
    u = x / 255
    fd = torch.zeros(3)
    for j in range(20):
        step = torch.zeros(20, dtype=torch.float64)
        step[j] = eps
        step = step.reshape(1, 1, 4, 5)
        d = (model.encode((u + step) * 255) - model.encode((u - step) * 255)) / (2 * eps)
        fd += (d ** 2).sum(1)
    assert torch.allclose(exact, fd.double(), rtol=1e-6)
    with pytest.raises(ValueError):
        MLPAutoencoder(input_size=[4, 5], hidden=[8], code_size=2, code_activation="sigmoid").contractive_penalty(x)


def test_a_linear_autoencoder_spans_the_pca_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    x = (rng.normal(size=(400, 12)) * np.array([3, 2.5, 2] + [0.2] * 9)) @ basis.T + 0.5  # three strong directions
    x = torch.tensor(x, dtype=torch.float32).reshape(400, 1, 3, 4)
    pca = build("pca", input_size=[3, 4], code_size=3, value_max=1.0).fit(x)
    torch.manual_seed(0)
    ae = MLPAutoencoder(input_size=[3, 4], hidden=[], code_size=3, output="linear", value_max=1.0)
    opt = torch.optim.Adam(ae.parameters(), lr=0.02)
    for _ in range(1500):
        opt.zero_grad()
        ((ae(x) - x) ** 2).mean().backward()
        opt.step()

    def projector(columns):
        q = torch.linalg.qr(columns)[0]
        return q @ q.T

    decoder = ae.decoder[0].weight.detach()  # [12, 3]: the span of every reconstruction
    assert (projector(decoder) - projector(pca.components.T)).abs().max() < 0.02
    from sklearn.decomposition import PCA

    sk = PCA(3).fit(x.flatten(1).numpy())
    assert (projector(pca.components.T) - projector(torch.tensor(sk.components_.T))).abs().max() < 1e-4
    # with a code as wide as the data, PCA reconstructs exactly
    full = build("pca", input_size=[3, 4], code_size=12, value_max=1.0).fit(x)
    assert torch.allclose(full(x), x, atol=1e-4)


@pytest.mark.parametrize("n,s,p,f", [(7, 2, 1, 4), (3, 3, 0, 3), (5, 2, 0, 2), (4, 1, 1, 3), (2, 3, 1, 5)])
def test_transposed_convolution_output_size_formula(n, s, p, f):
    out = nn.ConvTranspose2d(1, 1, f, stride=s, padding=p)(torch.zeros(1, 1, n, n))
    assert out.shape[-1] == (n - 1) * s - 2 * p + f


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (105, 1)])
def test_models_take_any_input_size_and_channel_count(size, channels):
    assert upsample(4, 4, (size // 2, size // 2), (size, size))(torch.zeros(1, 4, size // 2, size // 2)).shape[-1] \
        == size
    x = torch.rand(2, channels, size, size) * 255
    for arch, args in [("conv-autoencoder", {}), ("conv-autoencoder", dict(decoder="unpool")),
                       ("conv-autoencoder", dict(variational=True)), ("mlp-autoencoder", {})]:
        model = build(arch, input_size=[size, size], in_channels=channels, **args).eval()
        assert model(x).shape == x.shape and 0 <= float(model(x).min()) and float(model(x).max()) <= 255
    gan = build("dcgan", input_size=[size, size], in_channels=channels).eval()
    assert gan(torch.randn(2, 64)).shape == x.shape and gan.discriminate(x).shape == (2,)


def test_unpool_is_max_unpool_with_the_pooling_indices():
    x = torch.randn(2, 3, 9, 7)
    pooled, indices = nn.functional.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(unpool(pooled, indices, (9, 7)), nn.MaxUnpool2d(2)(pooled, indices, output_size=(9, 7)))


def test_vae_kl_term_matches_a_hand_computation():
    mu = torch.tensor([[0.0, 1.0], [0.5, -2.0]])
    logvar = torch.tensor([[0.0, 0.0], [np.log(4.0), np.log(0.25)]], dtype=torch.float32)
    # KL(N(m, s^2) || N(0, 1)) = (s^2 + m^2 - 1 - ln s^2) / 2 per dimension
    hand = [0.5 * (1 + 0 - 1 - 0) + 0.5 * (1 + 1 - 1 - 0),
            0.5 * (4 + 0.25 - 1 - np.log(4)) + 0.5 * (0.25 + 4 - 1 - np.log(0.25))]
    assert np.allclose(represent.kl_divergence(mu, logvar).numpy(), hand, atol=1e-6)


def test_importance_weighting_tightens_the_elbo():
    data = blobs(8)
    arch, args, kind, opts = represent.settings("vae", data, dict(represent.OPTIONS), "blobs")
    torch.manual_seed(0)
    model = build(arch, **args).eval()
    x = represent.binarized(data.images, 255.0)
    torch.manual_seed(0)
    elbo = np.mean([represent.mean_losses(model, to_tensor(x), kind, opts)["elbo_loss"] for _ in range(20)])
    nll = represent.importance_weighted_nll(model, x, k=500, chunk=200).mean()
    assert nll < elbo


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert represent.frechet_distance(a, a) < 1e-6
    assert abs(represent.frechet_distance(a, a + 2.0) - 12.0) < 1e-6  # ||(2, 2, 2)||^2, same covariance


def test_corruptions():
    torch.manual_seed(0)
    u = torch.full((1, 1, 50, 50), 0.5)
    assert abs(float(represent.corrupt(u, "gaussian", 0.1).std()) - 0.1) < 0.01
    masked = represent.corrupt(u, "masking", 0.3)
    assert abs(float((masked == 0).float().mean()) - 0.3) < 0.03
    salted = represent.corrupt(u, "salt-pepper", 0.2)
    assert abs(float((salted != 0.5).float().mean()) - 0.2) < 0.03 and set(salted.unique().tolist()) == {0, 0.5, 1}


def test_a_nan_ends_gan_training_with_one_line(tmp_path):
    data = blobs(16)
    data.images[0, 0, 0] = np.nan
    arch, args, kind, opts = represent.settings("dcgan", data, dict(represent.OPTIONS), "blobs")
    model = build(arch, **args)
    info = represent.model_info(data, arch, args, "dcgan", kind, opts, "blobs")
    config = represent.default_config("dcgan", epochs=1, batch_size=16, device="cpu")
    with pytest.raises(OculaError, match="GAN loss became"):
        represent.train_gan(model, info, data, None, config, run_dir=tmp_path, progress=False)


def test_gan_keeps_the_epoch_whose_samples_lie_nearest_validation(tmp_path, monkeypatch):
    states, scores = [], iter([5.0, 1.0, 3.0, 4.0])  # epoch 2's samples are the nearest

    def sample(model, n, **kw):  # the per-epoch sampling, which sees each epoch's weights
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_sample(model, n, **kw)

    real_sample = represent.sample
    monkeypatch.setattr(represent, "sample", sample)
    monkeypatch.setattr(represent, "classifier_features", lambda path, images, device: (images, None))
    monkeypatch.setattr(represent, "frechet_distance", lambda a, b: next(scores))
    train, val = blobs(48), blobs(40, seed=1)
    arch, args, kind, opts = represent.settings("dcgan", train, dict(represent.OPTIONS, feature_model="f"), "blobs")
    model = build(arch, **args)
    info = represent.model_info(train, arch, args, "dcgan", kind, opts, "blobs")
    config = represent.default_config("dcgan", epochs=4, batch_size=16, device="cpu")
    model, history = represent.train_gan(model, info, train, val, config, run_dir=tmp_path, progress=False)
    assert [h["val_frechet"] for h in history] == [5.0, 1.0, 3.0, 4.0] and len(states) == 4
    assert info.metrics["val_frechet"] == 1.0 and info.metrics["val_best_epoch"] == 2
    kept = model.state_dict()
    assert all(torch.equal(kept[k], states[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], states[3][k]) for k in kept)


# --- end to end: a trained file through the Python API and the CLI ------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import synthetic

    root = tmp_path_factory.mktemp("represent")
    data = synthetic.class_folder(root / "photos", per_class=9)
    runs = root / "runs"
    models = {name: ocula.train(data, name, epochs=2, batch_size=9, threads=1, runs_dir=runs, progress=False,
                                iw_samples=20) for name in ("vae", "conv-ae", "denoising-ae")}
    return data, models


def test_training_writes_metrics_and_pictures(trained):
    _, models = trained
    vae = models["vae"]
    assert vae.info.task == "represent" and vae.summary["test_iw_nll"] > 0 and vae.summary["test_mse"] > 0
    pictures = {p.name for p in vae.run_dir.glob("*.png")}
    assert {"reconstructions.png", "samples.png", "embedding.png", "interpolation.png", "loss.png"} <= pictures
    assert (models["denoising-ae"].run_dir / "denoising.png").is_file()
    assert "test_psnr_denoised" in models["denoising-ae"].summary


def test_python_api_embeds_reconstructs_and_samples(trained):
    data, models = trained
    model = ocula.load(models["vae"].path, device="cpu")
    image = data / "test" / "dark" / "0.png"
    embedded = model.predict(image, mode="embed")[0]
    assert embedded.code.shape == (20,) and embedded.output is None
    rebuilt = model.predict(image, mode="reconstruct")[0]
    assert rebuilt.output.shape == (16, 16, 3) and 0 < rebuilt.mse < 1 and "mse" in rebuilt.to_json()
    samples = model.sample(5, seed=3)
    assert samples.shape == (5, 16, 16, 3) and np.array_equal(samples, model.sample(5, seed=3))
    line = model.sample(interpolate=[image, data / "test" / "bright" / "0.png"], steps=6)
    assert line.shape == (6, 16, 16, 3)
    with pytest.raises(OculaError, match="no prior to sample"):
        ocula.load(models["conv-ae"].path, device="cpu").sample(4)
    assert model.evaluate(split="test")["iw_samples"] == 20


def test_embed_uses_the_code(trained, tmp_path):
    from ocula.tasks.embed import embed_data, load_vectors

    data, models = trained
    embed_data(models["conv-ae"].path, str(data), tmp_path / "v.safetensors", device="cpu")
    vectors, labels, _ = load_vectors(tmp_path / "v.safetensors")
    assert vectors.shape == (27, 32) and len(labels) == 27


def run(*args):
    return subprocess.run([sys.executable, "-m", "ocula", *map(str, args)], capture_output=True, text=True)


def test_cli_predict_and_sample(trained, tmp_path):
    data, models = trained
    image = data / "test" / "dark" / "0.png"
    out = run("predict", models["vae"].path, image, "--embed", "--json", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["code"]) == 20 and np.load(tmp_path / "0-code.npy").shape == (20,)
    out = run("predict", models["denoising-ae"].path, image, "--denoise", "--out", tmp_path)
    assert out.returncode == 0 and (tmp_path / "0-denoise.png").is_file()
    out = run("sample", models["vae"].path, "--n", 8, "--out", tmp_path / "s.png")
    assert out.returncode == 0 and np.load(tmp_path / "s.npy").shape == (8, 16, 16, 3)
    out = run("sample", models["conv-ae"].path)
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_onnx_parts_match_torch(trained, tmp_path):
    from ocula.export.onnx import onnx_session

    _, models = trained
    model = ocula.load(models["conv-ae"].path, device="cpu")
    said = model.export("onnx", tmp_path / "ae.onnx")
    assert said.count("max abs difference") == 3
    x = torch.rand(3, 3, 16, 16) * 255
    code = onnx_session(tmp_path / "ae-encoder.onnx").run(None, {"image": x.numpy()})[0]
    image = onnx_session(tmp_path / "ae-decoder.onnx").run(None, {"code": code})[0]
    with torch.no_grad():
        assert np.abs(code - model.module.encode(x).numpy()).max() < 1e-4
        assert np.abs(image - model.module.decode(torch.from_numpy(code)).numpy()).max() < 1e-2


def test_a_conv_encoder_initialises_the_classifier(trained, tmp_path):
    data, models = trained
    state, args = pretrained_weights(models["conv-ae"].path, "cnn")
    cnn = build("cnn", num_classes=3, **args).eval()
    assert set(cnn.load_state_dict(state, strict=False).missing_keys) == {"head.3.weight", "head.3.bias"}
    ae = ocula.load(models["conv-ae"].path, device="cpu").module
    x = torch.rand(2, 3, 16, 16) * 255
    with torch.no_grad():
        assert torch.allclose(cnn.features(cnn.normalize(x)), ae._features(x / 255)[0], atol=1e-5)
    trained_cnn = ocula.train(data, "cnn", encoder=str(models["conv-ae"].path), labels_per_class=3, epochs=1,
                              batch_size=9, threads=1, runs_dir=tmp_path, progress=False, val_fraction=0)
    assert {k: trained_cnn.info.args[k] for k in args} == args  # the encoder's shape and normalisation
    out = run("train", data, "--model", "cnn", "--encoder", models["vae"].path, "--runs-dir", tmp_path, "--name", "x")
    assert out.returncode == 1 and "needs a conv autoencoder" in out.stderr and "Traceback" not in out.stderr


def test_labelled_split_takes_that_many_of_each_class_and_leaves_the_rest():
    from ocula.tasks.classify import labelled_split

    data = blobs(40)
    picked, rest = labelled_split(data, 5, seed=1)
    assert np.bincount(picked.labels).tolist() == [5, 5] and len(rest) == 30
    assert not np.array_equal(picked.images, labelled_split(data, 5, seed=2)[0].images)
    with pytest.raises(OculaError, match="fewer than 30"):
        labelled_split(data, 30, seed=1)


def test_pseudo_labels_keep_the_surest_share_of_each_predicted_class():
    from ocula.tasks.classify import pseudo_labels

    class FirstPixels(nn.Module):  # the two pixels of each image are its logits
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * x.flatten(1)

    margins = [5, 1, 3, 2, 4, 6, -1, -4, -2, -3]  # six images predicted class 0, four class 1
    images = np.array([[[m, 0]] for m in margins], np.float32)
    pool = ImageSet(images, np.zeros(10, np.int64), ["a", "b"], 255.0)
    keep, labels = pseudo_labels(FirstPixels(), pool, share=0.5)
    assert keep.tolist() == [0, 4, 5, 7, 9] and labels.tolist() == [0, 0, 0, 1, 1]
    assert len(pseudo_labels(FirstPixels(), pool, share=1.0)[0]) == 10


def test_self_training_adds_pseudo_labelled_rounds(trained, tmp_path):
    data, _ = trained
    model = ocula.train(data, "cnn", labels_per_class=3, self_train=2, epochs=1, batch_size=9, threads=1,
                        runs_dir=tmp_path, progress=False, val_fraction=0)
    notes = model.summary["self_train"]
    assert notes[0]["pseudo_labels"] < notes[1]["pseudo_labels"] == 18  # 27 training images, 9 of them labelled
    assert all(0 <= n["pseudo_label_accuracy"] <= 1 for n in notes)
    assert (model.run_dir / "self-train" / "round-2" / "last.ocula").is_file()
    out = run("train", data, "--model", "cnn", "--self-train", "2", "--runs-dir", tmp_path, "--name", "y")
    assert out.returncode == 1 and "labels_per_class" in out.stderr and "Traceback" not in out.stderr


def test_pca_on_mnist_matches_the_measured_baseline(datasets):
    from ocula.data import registry

    train = registry.load("mnist", "train", datasets).subset(slice(0, 10_000))
    test = registry.load("mnist", "test", datasets).subset(slice(0, 2000))
    pca = build("pca", input_size=[28, 28], code_size=10).fit(to_tensor(train.images))
    mse = float(((pca(to_tensor(test.images)) - to_tensor(test.images)) ** 2).mean() / 255 ** 2)
    assert 0.030 < mse < 0.038  # the issue measured 0.0341 with all 60k training images
