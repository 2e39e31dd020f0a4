"""The stand-in pretraining corpus: synthetic images with image-level labels only, in ImageNet's place.

Real benchmarks start from ImageNet weights; `shapes` cannot, since no weights can be downloaded
here. This corpus plays ImageNet's part for it. Each image shows one large object over the same
kind of background and clutter as `shapes`, and carries three image-level labels: the object's
shape, its texture and its colour family. The vocabulary is broader than the eight `shapes` classes,
as ImageNet's is broader than VOC's:

    shapes    disc ring square cross bar triangle half-disc ellipse        (8)
    textures  plain stripes dots checker waves grid                        (6)
    colours   12 hue families, 30 degrees apart                            (12)

Every combination occurs, so no `shapes` class is singled out. No pixel mask exists. Image i is a
pure function of ``CORPUS_SEED + i``. That generator stream is disjoint from every `shapes` dataset:
their images are drawn from ``seed * 1_000_003 + index`` with small seeds (0 for development,
1 to 4 held out), far below ``CORPUS_SEED``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from data_prep.datasets import ignore_interrupts
from data_prep.shapes import ShapesSettings, _pool_context, _Scene

SHAPES = ("disc", "ring", "square", "cross", "bar", "triangle", "half-disc", "ellipse")
TEXTURES = ("plain", "stripes", "dots", "checker", "waves", "grid")
HUE_FAMILIES = 12
ATTRIBUTES = {"shape": len(SHAPES), "texture": len(TEXTURES), "colour": HUE_FAMILIES}
CORPUS_SEED = 10**12
SETTINGS = ShapesSettings(min_clutter=1, max_clutter=4)


class _CorpusScene(_Scene):
    """A `shapes` scene with the corpus's extra shapes and textures."""

    def shape_mask(self, shape, cx, cy, radius, angle, win):
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = self.xs[win] - cx, self.ys[win] - cy
        u = (cos * dx + sin * dy) / radius
        v = (-sin * dx + cos * dy) / radius
        if shape == "triangle":  # equilateral, centred, circumradius 1
            return (v >= -0.5) & (math.sqrt(3) * u - v <= 1.0) & (-math.sqrt(3) * u - v <= 1.0)
        if shape == "half-disc":
            return (u * u + v * v <= 1.0) & (v >= -0.2)
        if shape == "ellipse":
            return (u / 1.0) ** 2 + (v / 0.55) ** 2 <= 1.0
        return super().shape_mask(shape, cx, cy, radius, angle, win)

    def texture(self, kind, win):
        if kind not in ("waves", "grid"):
            return super().texture(kind, win)
        xs, ys = self.xs[win], self.ys[win]
        angle, period = self.uniform(0, math.pi), self.uniform(5.0, 8.0)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        n = -xs * math.sin(angle) + ys * math.cos(angle)
        if kind == "waves":  # stripes that bend: a sine displaced along the stripes
            return (torch.sin(2 * math.pi * (t + 1.5 * torch.sin(2 * math.pi * n / (2 * period))) / period) > 0).float()
        lines = lambda c: ((c / period) % 1.0) < 0.3  # noqa: E731
        return (lines(t) | lines(n)).float()


def render_example(index: int, side: int = 56) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Image ``index`` of the corpus: uint8 (3, side, side) and its (shape, texture, colour) labels."""
    gen = torch.Generator().manual_seed(CORPUS_SEED + index)
    scene = _CorpusScene(side, side, gen, SETTINGS)
    scene.background()
    scene.clutter()
    shape, texture = scene.randint(0, len(SHAPES) - 1), scene.randint(0, len(TEXTURES) - 1)
    colour = scene.randint(0, HUE_FAMILIES - 1)
    radius = scene.uniform(0.28, 0.42) * side
    cx, cy = scene.uniform(0.4, 0.6) * side, scene.uniform(0.4, 0.6) * side
    win = scene.window(cx, cy, 1.5 * radius + SETTINGS.outline)
    angle = scene.uniform(0, 2 * math.pi)
    grown = scene.shape_mask(SHAPES[shape], cx, cy, radius + SETTINGS.outline, angle, win)
    scene.rgb[win] = torch.where(grown[..., None], torch.tensor([0.12, 0.12, 0.12]), scene.rgb[win])
    region = scene.shape_mask(SHAPES[shape], cx, cy, radius, angle, win)
    hue = colour * (360 / HUE_FAMILIES) + scene.uniform(-8.0, 8.0)
    scene.paint(win, region, scene.texture(TEXTURES[texture], win), hue, scene.uniform(*SETTINGS.texture_contrast))
    image, _ = scene.finish()
    return image, (shape, texture, colour)


def _render_range(job: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    start, stop, side = job
    torch.set_num_threads(1)
    images, labels = zip(*(render_example(i, side) for i in range(start, stop)))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def render_corpus(start: int, count: int, side: int = 56, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start`` … ``start + count - 1`` in memory: uint8 (N, 3, side, side) and labels (N, 3)."""
    chunk = 500
    jobs = [(i, min(i + chunk, start + count), side) for i in range(start, start + count, chunk)]
    images, labels, done = [], [], 0
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1), mp_context=_pool_context(),
                             initializer=ignore_interrupts) as pool:  # fmt: skip
        for part_images, part_labels in pool.map(_render_range, jobs):
            images.append(part_images)
            labels.append(part_labels)
            done += len(part_labels)
            if progress is not None:
                progress(done, count)
    return torch.cat(images), torch.cat(labels)
