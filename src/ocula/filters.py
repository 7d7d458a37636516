"""The lecture's linear filters as batched, differentiable torch ops that match OpenCV.

Every op takes [N, C, H, W] floating-point images on any device and filters each channel on its own. Kernels are
applied as cross-correlation, as OpenCV's filter2D and torch's conv2d do: the Sobel x kernel [-1 0 1] responds
positively where intensity rises to the right (the lecture writes it flipped, [1 0 -1], as a convolution).

Border: `border="reflect101"` (default) is OpenCV's BORDER_DEFAULT / BORDER_REFLECT_101 (dcb|abcd|cba, torch's
'reflect' padding); 'replicate' (aaa|abcd|ddd), 'constant' (zeros) and 'circular' (OpenCV's BORDER_WRAP) also work.

The kernel builders (`gaussian_kernel`, `sobel_kernels`, `gabor_bank`, ...) return plain tensors, so a kernel can
seed a conv layer: `FilterBank(kernels, learnable=True)` starts from them and trains them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ocula.errors import OculaError

BORDERS = {"reflect101": "reflect", "replicate": "replicate", "constant": "constant", "circular": "circular"}

PREWITT = [[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]
SOBEL = [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]
SCHARR = [[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]]
# OpenCV's Laplacian: ksize=1 is the 4-neighbour kernel (the lecture's with the sign of +d2/dx2 + d2/dy2),
# ksize=3 its 3x3 Sobel-based version.
LAPLACIAN = {1: [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
             3: [[2.0, 0.0, 2.0], [0.0, -8.0, 0.0], [2.0, 0.0, 2.0]]}


def filter2d(x: torch.Tensor, kernels: torch.Tensor, *, border: str = "reflect101") -> torch.Tensor:
    """Correlate every channel of x [N, C, H, W] with each of `kernels` ([kh, kw] or [K, kh, kw], odd sizes,
    anchored at the centre). Returns [N, C, H, W] for one kernel, else [N, C*K, H, W] ordered channel-major
    (channel c, kernel k at c*K + k)."""
    if x.dim() != 4 or not x.is_floating_point():
        raise OculaError(f"filters take a floating-point [N, C, H, W] batch, got {x.dtype} {list(x.shape)}")
    if border not in BORDERS:
        raise OculaError(f"unknown border {border!r}; choose one of {', '.join(BORDERS)}")
    bank = kernels.to(device=x.device, dtype=x.dtype)
    bank = bank[None] if bank.dim() == 2 else bank
    k, kh, kw = bank.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise OculaError(f"kernels need odd sizes so that they have a centre, got {kh}x{kw}")
    ph, pw = kh // 2, kw // 2
    n, c, h, w = x.shape
    if border == "reflect101" and (ph >= h or pw >= w):
        raise OculaError(f"a {kh}x{kw} kernel is too large to reflect at the border of a {h}x{w} image")
    padded = F.pad(x, (pw, pw, ph, ph), mode=BORDERS[border])
    weight = bank[:, None].repeat(c, 1, 1, 1)  # [C*K, 1, kh, kw]: each channel meets every kernel
    return F.conv2d(padded, weight, groups=c)


def separable(x: torch.Tensor, column: torch.Tensor, row: torch.Tensor, *, border: str = "reflect101"):
    """filter2d with the outer product column x row, as two 1-D passes (k + k instead of k * k per pixel)."""
    return filter2d(filter2d(x, column[:, None], border=border), row[None, :], border=border)


# --- kernels --------------------------------------------------------------------------------------------------
def gaussian_1d(ksize: int, sigma: float, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """OpenCV's getGaussianKernel for sigma > 0: exp(-t^2 / (2 sigma^2)) at t = -(ksize-1)/2 .. (ksize-1)/2,
    normalised to sum 1."""
    if ksize < 1 or ksize % 2 == 0 or sigma <= 0:
        raise OculaError(f"a Gaussian needs an odd ksize >= 1 and sigma > 0, got ksize={ksize}, sigma={sigma}")
    t = torch.arange(ksize, device=device, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def gaussian_kernel(ksize: int, sigma: float, **like) -> torch.Tensor:
    """The 2-D Gaussian [ksize, ksize]: the lecture's f(m, n), sampled and normalised to sum 1."""
    g = gaussian_1d(ksize, sigma, **like)
    return g[:, None] * g[None, :]


def log_kernel(ksize: int, sigma: float, *, laplacian_ksize: int = 1, **like) -> torch.Tensor:
    """Laplacian of Gaussian as one [ksize + 2, ksize + 2] kernel: the Gaussian convolved with the discrete
    Laplacian, i.e. exactly OpenCV's Laplacian(GaussianBlur(x)) (the lecture's LoG formula, discretised)."""
    gauss = gaussian_kernel(ksize, sigma, **like)
    lap = torch.tensor(LAPLACIAN[laplacian_ksize], device=gauss.device, dtype=gauss.dtype)
    # A 'full' convolution; the Laplacian is symmetric, so correlation and convolution agree.
    return F.conv2d(F.pad(gauss[None, None], (2, 2, 2, 2)), lap[None, None])[0, 0]


def dog_kernel(ksize: int, sigma1: float, sigma2: float, **like) -> torch.Tensor:
    """Difference of Gaussians G(sigma1) - G(sigma2), one kernel: GaussianBlur(sigma1) - GaussianBlur(sigma2)."""
    return gaussian_kernel(ksize, sigma1, **like) - gaussian_kernel(ksize, sigma2, **like)


def gabor_kernel(ksize: int, sigma: float, theta: float, lambd: float, gamma: float = 0.5, psi: float = math.pi / 2,
                 *, device=None, dtype=torch.float64) -> torch.Tensor:
    """OpenCV's getGaborKernel((ksize, ksize), sigma, theta, lambd, gamma, psi), as filter2D applies it:
    exp(-(x'^2 + gamma^2 y'^2) / (2 sigma^2)) cos(2 pi x' / lambd + psi), x' = x cos theta + y sin theta,
    y' = -x sin theta + y cos theta. The lecture's sin(... + phi) is psi = phi - pi/2; OpenCV leaves out the
    1 / (2 pi sigma^2) factor and stores the kernel rotated by 180 degrees, so we do too."""
    half = ksize // 2
    if ksize % 2 == 0 or sigma <= 0 or lambd <= 0:
        raise OculaError(f"a Gabor kernel needs an odd ksize and sigma, lambd > 0, got {ksize}, {sigma}, {lambd}")
    # OpenCV fills entry (half - y, half - x) with the value at (x, y): rows and columns count down.
    t = half - torch.arange(ksize, device=device, dtype=torch.float64)
    y, x = torch.meshgrid(t, t, indexing="ij")
    c, s = math.cos(theta), math.sin(theta)
    xr, yr = x * c + y * s, -x * s + y * c
    envelope = torch.exp(-0.5 * (xr * xr + (gamma * yr) ** 2) / sigma ** 2)
    return (envelope * torch.cos(2 * math.pi / lambd * xr + psi)).to(dtype)


def gabor_bank(ksize: int, sigma: float, thetas, lambdas, gamma: float = 0.5, psi: float = math.pi / 2,
               **like) -> torch.Tensor:
    """Gabor kernels [len(lambdas) * len(thetas), ksize, ksize], wavelength-major."""
    return torch.stack([gabor_kernel(ksize, sigma, theta, lambd, gamma, psi, **like)
                        for lambd in lambdas for theta in thetas])


def derivative_kernels(name: str, **like) -> torch.Tensor:
    """[2, 3, 3]: the x and y first-derivative kernels of 'prewitt', 'sobel' or 'scharr'."""
    table = {"prewitt": PREWITT, "sobel": SOBEL, "scharr": SCHARR}
    if name not in table:
        raise OculaError(f"unknown derivative filter {name!r}; choose one of {', '.join(table)}")
    kx = torch.tensor(table[name], dtype=torch.float64).to(**like)
    return torch.stack([kx, kx.T])


# --- ops ------------------------------------------------------------------------------------------------------
def gaussian_blur(x: torch.Tensor, ksize: int, sigma: float, *, border: str = "reflect101") -> torch.Tensor:
    """cv2.GaussianBlur(x, (ksize, ksize), sigma), separably."""
    g = gaussian_1d(ksize, sigma, device=x.device, dtype=x.dtype)
    return separable(x, g, g, border=border)


def gradients(x: torch.Tensor, name: str = "sobel", *, border: str = "reflect101") -> tuple[torch.Tensor, ...]:
    """(d/dx, d/dy) with the Prewitt, Sobel or Scharr kernels: cv2.Sobel(x, CV_32F, 1, 0) and (0, 1) for
    'sobel', cv2.Scharr for 'scharr', filter2D with the Prewitt kernels for 'prewitt'."""
    out = filter2d(x, derivative_kernels(name), border=border)
    return out[:, 0::2], out[:, 1::2]


def gradient_magnitude_orientation(x: torch.Tensor, name: str = "sobel", *, border: str = "reflect101"):
    """(|grad|, atan2(dy, dx) in radians, -pi..pi): cv2.magnitude and cv2.phase of the Sobel (or other)
    derivatives; cv2.phase gives the same angle in 0..2 pi."""
    gx, gy = gradients(x, name, border=border)
    square = gx * gx + gy * gy
    # sqrt's gradient at 0 is infinite (NaN after the chain rule, e.g. at a reflected corner): use 0 there.
    magnitude = torch.where(square > 0, torch.sqrt(torch.where(square > 0, square, 1.0)), 0.0)
    return magnitude, torch.atan2(gy, gx)


def laplacian(x: torch.Tensor, ksize: int = 1, *, border: str = "reflect101") -> torch.Tensor:
    """cv2.Laplacian(x, CV_32F, ksize=1 or 3)."""
    if ksize not in LAPLACIAN:
        raise OculaError(f"laplacian ksize must be 1 or 3, got {ksize}")
    return filter2d(x, torch.tensor(LAPLACIAN[ksize]), border=border)


def laplacian_of_gaussian(x: torch.Tensor, ksize: int, sigma: float, *, border: str = "reflect101"):
    """cv2.Laplacian(cv2.GaussianBlur(x, (ksize, ksize), sigma), CV_32F): blur separably, then the 3x3 Laplacian.
    With reflect-101 borders this equals filter2d with `log_kernel` everywhere (both kernels are symmetric)."""
    return laplacian(gaussian_blur(x, ksize, sigma, border=border), border=border)


def difference_of_gaussians(x: torch.Tensor, ksize: int, sigma1: float, sigma2: float, *,
                            border: str = "reflect101") -> torch.Tensor:
    """GaussianBlur(x, sigma1) - GaussianBlur(x, sigma2): a band-pass that approximates the LoG's shape."""
    return gaussian_blur(x, ksize, sigma1, border=border) - gaussian_blur(x, ksize, sigma2, border=border)


class FilterBank(nn.Module):
    """A depthwise conv layer seeded with fixed kernels [K, kh, kw]: every input channel meets every kernel and
    the output is [N, C*K, H, W] (see `filter2d`). With `learnable=True` the kernels are a Parameter that
    training refines (e.g. a Gabor bank as a network's first layer); else a buffer, saved with the model."""

    def __init__(self, kernels: torch.Tensor, *, learnable: bool = False, border: str = "reflect101"):
        super().__init__()
        kernels = kernels.to(torch.float32)
        kernels = kernels[None] if kernels.dim() == 2 else kernels
        if learnable:
            self.kernels = nn.Parameter(kernels.clone())
        else:
            self.register_buffer("kernels", kernels.clone())
        self.border = border

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return filter2d(x, self.kernels, border=self.border)


def lecture_panels(gray: torch.Tensor, *, sigma: float = 2.0) -> list[tuple[str, torch.Tensor, str]]:
    """The lecture's filter panels for one grey image [H, W] in 0..1: (title, [H, W] map, kind) with kind
    'image' (0..1), 'signed' (a derivative: zero is mid-grey), 'positive' (a magnitude) or 'angle' (radians)."""
    x = gray[None, None]
    ksize = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the Gaussian
    px, py = gradients(x, "prewitt")
    sx, sy = gradients(x, "sobel")
    magnitude, orientation = gradient_magnitude_orientation(x, "sobel")
    # Flat regions have no direction worth showing: blank them (NaN is drawn as the background).
    orientation = torch.where(magnitude > 0.25 * magnitude.max(), orientation, torch.nan)
    thetas = [0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4]
    gabor = filter2d(x, gabor_bank(4 * ksize // 2 + 1, 2 * sigma, thetas, [5 * sigma]))
    panels = [("original", x, "image"), (f"Gaussian sigma={sigma:g}", gaussian_blur(x, ksize, sigma), "image"),
              ("Prewitt x (vertical edges)", px, "signed"), ("Prewitt y (horizontal edges)", py, "signed"),
              ("Sobel x", sx, "signed"), ("Sobel y", sy, "signed"),
              ("gradient magnitude (Sobel)", magnitude, "positive"),
              ("orientation (magnitude > 25% of max)", orientation, "angle"),
              ("Laplacian", laplacian(x), "signed"),
              (f"LoG sigma={sigma:g}", laplacian_of_gaussian(x, ksize, sigma), "signed"),
              (f"DoG sigma={sigma:g}, {1.6 * sigma:g}", difference_of_gaussians(x, 2 * ksize - 1, sigma, 1.6 * sigma),
               "signed")]
    panels += [(f"Gabor theta={round(math.degrees(t))} deg, lambda={5 * sigma:g}", gabor[:, i:i + 1], "signed")
               for i, t in enumerate(thetas)]
    return [(title, m[0, 0], kind) for title, m, kind in panels]
