"""``shapes``: the embedded synthetic segmentation dataset, written in Pascal VOC layout.

A class is a shape, a texture and a colour family together; each varies within its class (size,
rotation, stripe period and angle, dot pitch, hue, shade). Pairs of classes differ in one
attribute only, so the model must use texture *and* shape *and* colour:

    red-stripe-disc / red-dot-disc           same shape and colour, other texture
    blue-stripe-square / blue-stripe-cross    same texture and colour, other shape
    green-check-ring / green-check-disc       a ring is a disc with a hole
    yellow-dot-square / orange-dot-square     neighbouring colour families

Scenes hold 2-4 objects that occlude each other over a cluttered background of textured blobs
and bars in any colour, labelled background. Every image is a pure function of (seed, index).

The generator settings below were calibrated once with the supervised variant and then frozen
(docs/shapes.md). Changing them invalidates every comparison made on this dataset.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import encode_jpeg

from data_prep.atomic import atomic_path
from data_prep.datasets import ignore_interrupts
from data_prep.palette import voc_palette

CLASSES = (
    "background",
    "red-stripe-disc",
    "red-dot-disc",
    "blue-stripe-square",
    "blue-stripe-cross",
    "green-check-ring",
    "green-check-disc",
    "yellow-dot-square",
    "orange-dot-square",
)

# (shape, texture, hue in degrees) per foreground class, in CLASSES order.
_CLASS_LOOKS = (
    ("disc", "stripes", 0.0),
    ("disc", "dots", 0.0),
    ("square", "stripes", 225.0),
    ("cross", "stripes", 225.0),
    ("ring", "checker", 120.0),
    ("disc", "checker", 120.0),
    ("square", "dots", 56.0),
    ("square", "dots", 30.0),
)
_TEXTURES = ("stripes", "dots", "checker", "plain")


@dataclass(frozen=True)
class ShapesSettings:
    """Generator settings. Frozen after calibration: see docs/shapes.md."""

    train: int = 1024
    val: int = 256
    min_side: int = 64
    max_side: int = 96
    side_step: int = 8  # sides are multiples of this, so equal-size images batch together
    min_objects: int = 2
    max_objects: int = 4
    min_clutter: int = 3
    max_clutter: int = 7
    object_scale: tuple[float, float] = (0.16, 0.30)  # object radius / shorter image side
    object_margin: float = 0.6  # object centres keep this many radii from the image edge
    outline: float = 1.5  # width in pixels of the dark outline that separates overlapping objects
    hue_jitter: float = 10.0  # degrees
    texture_contrast: tuple[float, float] = (0.35, 0.7)
    noise: float = 0.05
    jpeg_quality: int = 92


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Vectorised HSV -> RGB; h in degrees, s and v in [0, 1]; returns (..., 3)."""
    h = (h % 360.0) / 60.0
    c = v * s
    x = c * (1 - (h % 2 - 1).abs())
    m = v - c
    sector = h.floor().long() % 6
    zeros = torch.zeros_like(c)
    table = torch.stack(
        [
            torch.stack([c, x, zeros], -1),
            torch.stack([x, c, zeros], -1),
            torch.stack([zeros, c, x], -1),
            torch.stack([zeros, x, c], -1),
            torch.stack([x, zeros, c], -1),
            torch.stack([c, zeros, x], -1),
        ],
        0,
    )
    rgb = table.gather(0, sector[None, ..., None].expand(1, *sector.shape, 3))[0]
    return rgb + m[..., None]


class _Scene:
    """One image being drawn; every random draw goes through its own generator."""

    def __init__(self, height: int, width: int, gen: torch.Generator, settings: ShapesSettings):
        self.h, self.w, self.gen, self.s = height, width, gen, settings
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
        )
        self.ys, self.xs = ys, xs
        self.rgb = torch.zeros(height, width, 3)
        self.label = torch.zeros(height, width, dtype=torch.uint8)

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=self.gen).item()

    def randint(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return int(torch.randint(lo, hi + 1, (), generator=self.gen))

    def window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """The part of the canvas a shape centred at (cx, cy) with this reach can touch."""
        y0, y1 = max(0, math.floor(cy - reach)), min(self.h, math.ceil(cy + reach) + 1)
        x0, x1 = max(0, math.floor(cx - reach)), min(self.w, math.ceil(cx + reach) + 1)
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))

    def shape_mask(self, shape: str, cx: float, cy: float, radius: float, angle: float, win) -> torch.Tensor:
        cos, sin = math.cos(angle), math.sin(angle)
        dx, dy = self.xs[win] - cx, self.ys[win] - cy
        u = (cos * dx + sin * dy) / radius
        v = (-sin * dx + cos * dy) / radius
        r2 = u * u + v * v
        if shape == "disc":
            return r2 <= 1.0
        if shape == "ring":
            return (r2 <= 1.0) & (r2 >= 0.5**2)
        if shape == "square":
            return torch.maximum(u.abs(), v.abs()) <= 0.82
        if shape == "cross":
            return ((u.abs() <= 1.0) & (v.abs() <= 0.36)) | ((u.abs() <= 0.36) & (v.abs() <= 1.0))
        if shape == "bar":
            return (u.abs() <= 1.0) & (v.abs() <= 0.22)
        raise ValueError(shape)

    def texture(self, kind: str, win) -> torch.Tensor:
        """A pattern in [0, 1] over the window, in canvas coordinates."""
        xs, ys = self.xs[win], self.ys[win]
        if kind == "plain":
            return torch.full(xs.shape, 0.5)
        angle = self.uniform(0, math.pi)
        period = self.uniform(5.0, 8.0)
        phase = self.uniform(0, period)
        t = xs * math.cos(angle) + ys * math.sin(angle) + phase
        n = -xs * math.sin(angle) + ys * math.cos(angle) + phase
        if kind == "stripes":
            return (torch.sin(2 * math.pi * t / period) > 0).float()
        if kind == "checker":
            return ((torch.sin(2 * math.pi * t / period) * torch.sin(2 * math.pi * n / period)) > 0).float()
        if kind == "dots":
            ft = (t / period) % 1.0 - 0.5
            fn = (n / period) % 1.0 - 0.5
            return ((ft * ft + fn * fn) <= 0.28**2).float()
        raise ValueError(kind)

    def paint(self, win, region: torch.Tensor, texture: torch.Tensor, hue: float, contrast: float) -> None:
        sat = self.uniform(0.55, 0.95)
        value = self.uniform(0.6, 0.95)
        hi = _hsv_to_rgb(torch.tensor(hue), torch.tensor(sat), torch.tensor(value))
        lo = _hsv_to_rgb(torch.tensor(hue), torch.tensor(sat * 0.7), torch.tensor(value * (1 - contrast)))
        colour = lo + (hi - lo) * texture[..., None]
        self.rgb[win] = torch.where(region[..., None], colour, self.rgb[win])

    def background(self) -> None:
        # A smooth two-colour gradient plus low-frequency blotches.
        hue = self.uniform(0, 360)
        base = _hsv_to_rgb(
            torch.tensor(hue), torch.tensor(self.uniform(0.0, 0.35)), torch.tensor(self.uniform(0.3, 0.8))
        )
        other = _hsv_to_rgb(
            torch.tensor(self.uniform(0, 360)),
            torch.tensor(self.uniform(0.0, 0.35)),
            torch.tensor(self.uniform(0.3, 0.8)),
        )
        angle = self.uniform(0, 2 * math.pi)
        ramp = (self.xs * math.cos(angle) + self.ys * math.sin(angle)) / max(self.h, self.w)
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min() + 1e-6)
        coarse = torch.rand(1, 1, 5, 5, generator=self.gen)
        coarse = torch.nn.functional.interpolate(coarse, size=(self.h, self.w), mode="bicubic", align_corners=False)[
            0, 0
        ]
        mix = (0.6 * ramp + 0.4 * coarse).clamp(0, 1)
        self.rgb = base + (other - base) * mix[..., None]

    def clutter(self) -> None:
        """Background distractors: small textured blobs and bars in any colour, including the
        classes' hues, labelled background."""
        side = min(self.h, self.w)
        for _ in range(self.randint(self.s.min_clutter, self.s.max_clutter)):
            shape = ("disc", "bar", "square", "bar")[self.randint(0, 3)]
            radius = self.uniform(0.05, 0.12) * side
            if shape == "bar":
                radius *= 2.2
            cx, cy, angle = self.uniform(0, self.w), self.uniform(0, self.h), self.uniform(0, math.pi)
            win = self.window(cx, cy, 1.5 * radius)
            region = self.shape_mask(shape, cx, cy, radius, angle, win)
            texture = self.texture(_TEXTURES[self.randint(0, 3)], win)
            self.paint(win, region, texture, self.uniform(0, 360), self.uniform(*self.s.texture_contrast))

    def objects(self) -> None:
        side = min(self.h, self.w)
        for _ in range(self.randint(self.s.min_objects, self.s.max_objects)):
            cls = self.randint(1, len(CLASSES) - 1)
            shape, texture_kind, hue = _CLASS_LOOKS[cls - 1]
            radius = self.uniform(*self.s.object_scale) * side
            margin = self.s.object_margin * radius
            cx = self.uniform(margin, self.w - margin)
            cy = self.uniform(margin, self.h - margin)
            angle = self.uniform(0, 2 * math.pi)
            win = self.window(cx, cy, 1.5 * radius + self.s.outline)
            # The outline is the shape grown by ``outline`` pixels, drawn dark first; it belongs to
            # the object, so instances stay apart where they overlap.
            grown = self.shape_mask(shape, cx, cy, radius + self.s.outline, angle, win)
            self.rgb[win] = torch.where(grown[..., None], torch.tensor([0.12, 0.12, 0.12]), self.rgb[win])
            region = self.shape_mask(shape, cx, cy, radius, angle, win)
            hue = hue + self.uniform(-self.s.hue_jitter, self.s.hue_jitter)
            self.paint(win, region, self.texture(texture_kind, win), hue, self.uniform(*self.s.texture_contrast))
            self.label[win][grown] = cls

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(self.h, self.w, 3, generator=self.gen) * self.s.noise
        rgb = (self.rgb + noise).clamp(0, 1)
        image = (rgb * 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()  # (3, H, W)
        return image, self.label


def render(seed: int, index: int, settings: ShapesSettings = ShapesSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (3, H, W) uint8 and label (H, W) uint8 number ``index`` of the dataset ``seed``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    steps = (settings.max_side - settings.min_side) // settings.side_step + 1
    height = settings.min_side + settings.side_step * int(torch.randint(0, steps, (), generator=gen))
    width = settings.min_side + settings.side_step * int(torch.randint(0, steps, (), generator=gen))
    scene = _Scene(height, width, gen, settings)
    scene.background()
    scene.clutter()
    scene.objects()
    return scene.finish()


def synthesize(root: Path, seed: int = 0, settings: ShapesSettings = ShapesSettings(), progress=None) -> Path:
    """Write the dataset to ``root`` in VOC layout, atomically: ``root`` appears complete or not at all.

    ``progress(done, total)`` is called as images are written.
    """
    total = settings.train + settings.val
    ids = [f"shapes_{i:05d}" for i in range(total)]
    with atomic_path(Path(root), directory=True) as tmp:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClass").mkdir()
        (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
        jobs = [(tmp, seed, start, ids[start : start + _CHUNK], settings) for start in range(0, total, _CHUNK)]
        workers = min(len(jobs), os.cpu_count() or 1)
        done = 0
        # Images are independent, so processes draw them side by side; each is a pure function of (seed, index).
        with ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=ignore_interrupts) as pool:
            for written in pool.map(_write_chunk, jobs):
                done += written
                if progress is not None:
                    progress(done, total)
        sets = tmp / "ImageSets" / "Segmentation"
        (sets / "train.txt").write_text("\n".join(ids[: settings.train]) + "\n")
        (sets / "val.txt").write_text("\n".join(ids[settings.train :]) + "\n")
        meta = {"generator": "s4mim shapes", "seed": seed, "classes": list(CLASSES), "settings": asdict(settings)}
        (tmp / "shapes.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Path(root)


_CHUNK = 128


def _pool_context():
    """fork is cheap; it is unsafe once Ray's threads run in this process, where spawn is used."""
    ray = sys.modules.get("ray")
    if sys.platform == "linux" and not (ray is not None and ray.is_initialized()):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _write_chunk(job) -> int:
    folder, seed, start, ids, settings = job
    torch.set_num_threads(1)
    palette = voc_palette()
    for offset, image_id in enumerate(ids):
        image, label = render(seed, start + offset, settings)
        jpeg = encode_jpeg(image, quality=settings.jpeg_quality).numpy().tobytes()
        (folder / "JPEGImages" / f"{image_id}.jpg").write_bytes(jpeg)
        mask = Image.fromarray(label.numpy(), mode="P")
        mask.putpalette(palette)
        mask.save(folder / "SegmentationClass" / f"{image_id}.png")
    return len(ids)


def read_meta(root: Path) -> dict | None:
    """The ``shapes.json`` a generated dataset carries (seed, settings, classes); None when it is missing or
    not a JSON object."""
    meta_path = Path(root) / "shapes.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) else None


def is_complete(root: Path, seed: int, settings: ShapesSettings = ShapesSettings()) -> bool:
    """True when ``root`` holds this exact dataset (same seed and settings)."""
    meta = read_meta(root)
    expected = json.loads(json.dumps(asdict(settings)))
    return meta is not None and meta.get("seed") == seed and meta.get("settings") == expected
