"""Filters: each op equals OpenCV on real photos within 1e-4 (float input in 0..1), any border, batched,
differentiable, usable as a fixed or learnable layer; the panel command."""

import math

import numpy as np
import pytest
import torch

from ocula import filters as f
from ocula.cli import main
from ocula.data.images import read_image
from ocula.errors import OculaError

from conftest import DATASETS, REPO

cv2 = pytest.importorskip("cv2")
TOL = 1e-4
BORDERS = {"reflect101": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


def photos():
    """A photographed digit (in the package) and a blood smear (shared data, when present), shrunk 4x."""
    paths = [REPO / "src/ocula/samples/digit-3.jpg", DATASETS / "bccd/BCCD/JPEGImages/BloodImage_00000.jpg"]
    return [np.ascontiguousarray(read_image(p)[::4, ::4], dtype=np.float32) / 255 for p in paths if p.exists()]


@pytest.fixture(scope="module", params=range(2), ids=["digit", "smear"])
def image(request):
    found = photos()
    if request.param >= len(found):
        pytest.skip("needs the BCCD copy in the shared datasets folder")
    return found[request.param]


def batch(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()


def as_hwc(t):
    return t[0].permute(1, 2, 0).numpy()


def same(ours, theirs):
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() < TOL


@pytest.mark.parametrize("border", BORDERS)
def test_gaussian_sobel_scharr_laplacian_match_opencv(image, border):
    x, b = batch(image), BORDERS[border]
    same(as_hwc(f.gaussian_blur(x, 7, 1.5, border=border)), cv2.GaussianBlur(image, (7, 7), 1.5, borderType=b))
    for name, op in (("sobel", cv2.Sobel), ("scharr", cv2.Scharr)):
        gx, gy = f.gradients(x, name, border=border)
        same(as_hwc(gx), op(image, cv2.CV_32F, 1, 0, borderType=b))
        same(as_hwc(gy), op(image, cv2.CV_32F, 0, 1, borderType=b))
    for k in (1, 3):
        same(as_hwc(f.laplacian(x, k, border=border)), cv2.Laplacian(image, cv2.CV_32F, ksize=k, borderType=b))


def test_prewitt_log_dog_match_opencv(image):
    x = batch(image)
    px, py = f.gradients(x, "prewitt")
    kernel = np.array(f.PREWITT, np.float32)
    same(as_hwc(px), cv2.filter2D(image, cv2.CV_32F, kernel))
    same(as_hwc(py), cv2.filter2D(image, cv2.CV_32F, kernel.T.copy()))
    log = cv2.Laplacian(cv2.GaussianBlur(image, (9, 9), 2.0), cv2.CV_32F)
    same(as_hwc(f.laplacian_of_gaussian(x, 9, 2.0)), log)
    same(as_hwc(f.filter2d(x, f.log_kernel(9, 2.0))), log)  # one 11x11 kernel, the same with reflect-101 borders
    dog = cv2.GaussianBlur(image, (13, 13), 1.0) - cv2.GaussianBlur(image, (13, 13), 2.0)
    same(as_hwc(f.difference_of_gaussians(x, 13, 1.0, 2.0)), dog)
    same(as_hwc(f.filter2d(x, f.dog_kernel(13, 1.0, 2.0))), dog)


def test_gabor_kernel_and_bank_match_opencv(image):
    x = batch(image)
    thetas, lambdas = [0.0, 0.7, math.pi / 2], [6.0, 10.0]
    bank = f.gabor_bank(21, 4.0, thetas, lambdas, gamma=0.5, psi=0.3)
    out = f.filter2d(x, bank)
    assert out.shape == (1, 3 * len(bank), *image.shape[:2])
    for k, (lambd, theta) in enumerate((lam, th) for lam in lambdas for th in thetas):
        kernel = cv2.getGaborKernel((21, 21), 4.0, theta, lambd, 0.5, 0.3, ktype=cv2.CV_64F)
        assert np.abs(bank[k].numpy() - kernel).max() < 1e-12
        theirs = cv2.filter2D(image, cv2.CV_32F, kernel.astype(np.float32))
        same(out[0, k::len(bank)].permute(1, 2, 0).numpy(), theirs)  # channel-major: channel c at c*K + k


def test_gradient_magnitude_and_orientation_match_opencv(image):
    magnitude, orientation = f.gradient_magnitude_orientation(batch(image))
    sx, sy = cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1)
    same(as_hwc(magnitude), cv2.magnitude(sx, sy))
    # cv2.phase is 0..2pi; ours is atan2's -pi..pi. Where the gradient is tiny its direction is noise, so only
    # gradients above 0.05 are compared, to the exact angle (cv2.phase promises about 0.3 degrees).
    strong = cv2.magnitude(sx, sy) > 0.05
    ours = as_hwc(orientation)
    assert (ours >= -np.pi).all() and (ours <= np.pi).all()
    assert angle_between(ours, np.arctan2(sy, sx))[strong].max() < TOL
    assert angle_between(ours, cv2.phase(sx, sy))[strong].max() < math.radians(0.3)


def angle_between(a, b):
    """|a - b| on the circle (so -pi and pi, or 0 and 2pi, are one angle)."""
    return np.abs(np.angle(np.exp(1j * (a.astype(np.float64) - b))))


def test_gaussian_kernel_is_opencvs():
    for ksize, sigma in ((3, 0.8), (7, 1.5), (15, 3.0)):
        assert np.abs(f.gaussian_1d(ksize, sigma).numpy() - cv2.getGaussianKernel(ksize, sigma)[:, 0]).max() < 1e-12
    assert f.gaussian_kernel(7, 1.5).sum().item() == pytest.approx(1.0)


def test_batched_on_the_input_device_and_dtype():
    x = torch.rand(3, 2, 20, 24, dtype=torch.float64)
    out = f.gaussian_blur(x, 5, 1.0)
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert torch.allclose(out[1:2], f.gaussian_blur(x[1:2], 5, 1.0))  # images do not leak into each other
    if torch.cuda.is_available():
        assert torch.allclose(f.laplacian_of_gaussian(x.cuda(), 5, 1.0).cpu(), f.laplacian_of_gaussian(x, 5, 1.0))


def test_differentiable():
    x = torch.rand(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: f.gradient_magnitude_orientation(t)[0], (x,))
    assert torch.autograd.gradcheck(lambda t: f.filter2d(t, f.gabor_kernel(5, 1.5, 0.5, 4.0)), (x,))


def test_filter_bank_fixed_or_learnable():
    sobel = f.derivative_kernels("sobel")
    fixed, learnable = f.FilterBank(sobel), f.FilterBank(sobel, learnable=True)
    assert list(fixed.parameters()) == [] and "kernels" in fixed.state_dict()
    x = torch.rand(2, 3, 16, 16)
    gx, gy = f.gradients(x)
    assert torch.allclose(fixed(x)[:, 0::2], gx) and torch.allclose(fixed(x)[:, 1::2], gy)
    # A few steps towards a target made by a Laplacian move the learnable bank's kernels.
    target = f.laplacian(x)
    optimizer = torch.optim.SGD(learnable.parameters(), lr=0.01)
    with torch.no_grad():
        before = (learnable(x)[:, 0::2] - target).square().mean().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss = (learnable(x)[:, 0::2] - target).square().mean()
        loss.backward()
        optimizer.step()
    assert loss.item() < before
    assert not torch.equal(learnable.kernels.detach(), sobel.float())


def test_bad_input_is_a_clear_error():
    with pytest.raises(OculaError, match="floating-point"):
        f.gaussian_blur(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 3, 1.0)
    with pytest.raises(OculaError, match="unknown border"):
        f.laplacian(torch.zeros(1, 1, 8, 8), border="reflect")
    with pytest.raises(OculaError, match="too large to reflect"):
        f.gaussian_blur(torch.zeros(1, 1, 4, 4), 11, 2.0)
    with pytest.raises(OculaError, match="odd"):
        f.gaussian_kernel(4, 1.0)


def test_filters_command_draws_the_panels(tmp_path, capsys):
    out = tmp_path / "panel.png"
    main_exit(["filters", str(REPO / "src/ocula/samples/digit-3.jpg"), "--out", str(out), "--max-side", "160"])
    assert out.stat().st_size > 10_000 and str(out) in capsys.readouterr().out
    assert main_exit(["filters", str(tmp_path / "missing.jpg"), "--out", str(out)]) == 1
    assert "missing.jpg" in capsys.readouterr().err


def test_lecture_panels_cover_every_filter():
    titles = [t for t, _, _ in f.lecture_panels(torch.rand(40, 50))]
    for name in ("Gaussian", "Prewitt x", "Prewitt y", "Sobel x", "Sobel y", "magnitude", "orientation",
                 "Laplacian", "LoG", "DoG", "Gabor theta=0", "Gabor theta=135"):
        assert any(name in t for t in titles), name


def main_exit(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code
