"""In-memory mini-batches with augmentation done on whole batches (far faster on a CPU than per-image work)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, g: torch.Generator, *, shift: float = 0.1, rotate: float = 10.0,
                  scale: float = 0.1, hflip: bool = False) -> torch.Tensor:
    """Random shift (fraction of size), rotation (degrees), zoom and optional mirroring, per image, zero fill."""
    n = x.shape[0]
    u = torch.rand(n, 5, generator=g) * 2 - 1
    angle = u[:, 0] * math.radians(rotate)
    s = 1 + u[:, 1] * scale
    mirror = torch.where(u[:, 4] < 0, -1.0, 1.0) if hflip else torch.ones(n)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * mirror, -sin, u[:, 2] * shift * 2], 1),
                         torch.stack([sin * mirror, cos, u[:, 3] * shift * 2], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ArrayBatches:
    """Shuffled batches of (images [N, C, H, W] float, labels [N]) with optional batch augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 augment=None, drop_last: bool = False):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __call__(self, g: torch.Generator):
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self._augment(self.images[idx], idx, g), self.labels[idx]

    def _augment(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return x if self.augment is None else self.augment(x, g)


class FlipTranslateBatches(ArrayBatches):
    """airbench's augmentation: every image is mirrored in alternate epochs (a fixed random half of the images in
    even epochs, the other half in odd ones), so any two consecutive epochs show each image both ways, which
    independent random flips do not; and shifted by up to `translate` pixels with reflected borders. The trainer
    tells the epoch through `set_epoch`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, translate: int = 2,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = False):
        super().__init__(images, labels, batch_size, shuffle=shuffle, drop_last=drop_last)
        self.translate, self.epoch = translate, 0
        self.mirrored = torch.rand(len(labels), generator=torch.Generator().manual_seed(seed)) < 0.5

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _augment(self, x, idx, g):
        flip = self.mirrored[idx] ^ bool(self.epoch % 2)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        t = self.translate
        if not t:
            return x
        n, c, h, w = x.shape
        padded = F.pad(x, (t, t, t, t), mode="reflect")
        dy, dx = torch.randint(0, 2 * t + 1, (2, n, 1), generator=g)
        rows = (dy + torch.arange(h))[:, None, :, None]
        cols = (dx + torch.arange(w))[:, None, None, :]
        return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def prefetch(batches, depth: int = 2, pin: bool = False):
    """Yield from `batches` while a background thread prepares the next `depth` ones, so cropping and augmenting
    (Python and numpy, which release the GIL in their heavy parts) overlap the training step. The order is
    unchanged, so seeded runs stay exactly repeatable. `pin` puts tensors in pinned memory for async GPU copies."""
    import queue
    import threading

    from ocula.engine.device import map_tensors

    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for batch in batches:
                if pin:
                    batch = map_tensors(batch, torch.Tensor.pin_memory)
                while not stop.is_set():
                    try:
                        items.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            items.put(e)
            return
        items.put(done)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (a callback ended training): let the producer finish
        worker.join()
