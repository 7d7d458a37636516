"""Detection ops: greedy NMS on 10k random boxes (vectorised vs the one-box-at-a-time loop, same keep) and
RoIAlign / RoIPool for 512 RoIs on a 1x256x50x50 map (7x7, sampling_ratio 2), forward and forward+backward.

    python benchmarks/ops.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

from ocula.models.detection.boxes import box_iou, nms  # noqa: E402
from ocula.models.detection.roi import roi_align, roi_pool  # noqa: E402


def loop_nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """The textbook greedy loop: take the best remaining box, drop its overlaps, repeat."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    while order.numel():
        best = order[0]
        keep.append(best)
        rest = order[1:]
        order = rest[box_iou(boxes[best][None], boxes[rest])[0] <= thr]
    return torch.stack(keep)


def random_boxes(n: int, image: float = 1000.0, seed: int = 0) -> torch.Tensor:
    """Top-left corners uniform on the image, sides uniform in [16, 256): RPN-like sizes, many overlaps."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * image
    wh = 16 + torch.rand(n, 2, generator=g) * 240
    return torch.cat([xy, xy + wh], dim=1)


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    args = parser.parse_args()
    thread_counts = sorted({1, os.cpu_count() or 1})

    def timed(fn) -> list[str]:
        cells = []
        for threads in thread_counts:
            torch.set_num_threads(threads)
            cells.append(f"{median_ms(fn, args.repeat):.1f}")
        return cells

    rows = []
    boxes = random_boxes(10_000)
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(1))
    for thr in (0.5, 0.7):
        keep = nms(boxes, scores, thr)
        torch.set_num_threads(1)
        start = time.perf_counter()
        ref = loop_nms(boxes, scores, thr)  # slow: timed once
        loop_ms = (time.perf_counter() - start) * 1000
        same = "yes" if torch.equal(keep, ref) else "NO"
        rows.append([f"NMS, 10k boxes, IoU {thr}", *timed(lambda: nms(boxes, scores, thr)),
                     f"kept {keep.numel()}; greedy loop {loop_ms:.0f} ms (1 thread), same keep: {same}"])

    g = torch.Generator().manual_seed(2)
    feat = torch.randn(1, 256, 50, 50, generator=g)
    xy = torch.rand(512, 2, generator=g) * 700
    wh = 16 + torch.rand(512, 2, generator=g) * 240
    rois = torch.cat([torch.zeros(512, 1), xy, xy + wh], dim=1)  # image coordinates, stride 16
    leaf = feat.clone().requires_grad_(True)
    for name, op in (("RoIAlign 7x7, sampling 2", lambda f: roi_align(f, rois, 7, 1 / 16, 2)),
                     ("RoIPool 7x7", lambda f: roi_pool(f, rois, 7, 1 / 16))):
        rows.append([f"{name}, 512 RoIs on 1x256x50x50, forward", *timed(lambda: op(feat)), ""])
        rows.append([f"{name}, 512 RoIs on 1x256x50x50, forward+backward",
                     *timed(lambda: op(leaf).sum().backward()), ""])

    header = ["op", *[f"ms, {t} thread{'s' * (t > 1)}" for t in thread_counts], "notes"]
    note = (f"Median of {args.repeat} runs after a warm-up. Boxes: corners uniform on a 1000x1000 image, sides "
            "uniform in [16, 256). Wall time on a machine shared with other jobs, so treat as rough.")
    record("Detection ops", f"{markdown_table(header, rows)}\n\n{note}")


if __name__ == "__main__":
    main()
