"""torch Datasets for labeled, unlabeled and validation samples, and the sharded sampler.

Training datasets are indexed by ``(index, seed)`` keys: each sample's augmentation draws from
its own seeded RNG, so a sample looks the same whatever the number of loader processes, and a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from data_prep.augment import StrongView, WeakView, cutmix_box, normalize
from data_prep.decode import read_image, read_mask

# Imported from here by the shapes and corpus pools, whose code is in the stand-in's fingerprint.
from data_prep.workers import ignore_interrupts as ignore_interrupts

Key = tuple[int, int]


class _Samples(Dataset):
    def __init__(self, rows: list[dict], label_lut: list[int] | None = None):
        self.rows = rows
        self.lut = torch.tensor(label_lut, dtype=torch.uint8) if label_lut else None

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, index: int) -> torch.Tensor:
        return read_image(self.rows[index]["image"])

    def mask(self, index: int) -> torch.Tensor:
        return read_mask(self.rows[index]["mask"], self.lut)


def _seed_cpu(seed: int) -> None:
    """Seed the CPU generator the augmentations draw from, and only it.

    ``torch.manual_seed`` also seeds every accelerator: on a CUDA build of torch that queues a lazy seed call
    with a formatted stack trace, about 1 ms a sample on CPU (a quarter of the UniMatch loader's time), and
    in a loader that runs in the training process it would reseed the training's CUDA generator."""
    torch.random.default_generator.manual_seed(seed)


class LabeledDataset(_Samples):
    """Weak views of labeled images: ``image`` (3, S, S), ``label`` (S, S), ``padding`` (S, S) bool."""

    def __init__(self, rows, crop: int, scale_range=(0.5, 2.0), label_lut=None, pad: str = "black_bottom_right"):
        super().__init__(rows, label_lut)
        self.weak = WeakView(crop, scale_range, pad)

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            _seed_cpu(seed)
            image, label = self.image(index), self.mask(index)
            image, label, padding = self.weak(image, label[None], torch.zeros_like(label)[None])
        return {"image": normalize(image), "label": label[0].long(), "padding": padding[0] == 255}


class UnlabeledDataset(_Samples):
    """A weak view, two strong views of it, the padding mask and a CutMix box per strong view.

    With ``truth``, also the image's own mask cropped as the weak view (``truth``, 255 in padding), for
    measuring pseudo labels; the views and boxes are the same with or without it.
    """

    def __init__(self, rows, crop: int, scale_range=(0.5, 2.0), cutmix_p: float = 0.5, strong: dict | None = None,
                 pad: str = "black_bottom_right", truth: bool = False, label_lut=None):  # fmt: skip
        super().__init__(rows, label_lut)
        self.truth = truth
        self.crop = crop
        self.weak = WeakView(crop, scale_range, pad)
        self.strong = StrongView(**(strong or {}))
        self.cutmix_p = cutmix_p

    def __getitem__(self, key: Key) -> dict[str, torch.Tensor]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            _seed_cpu(seed)
            image = self.image(index)
            masks = [torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)] + (
                [self.mask(index)[None]] if self.truth else []
            )
            weak, padding, *truth = self.weak(image, *masks)
            strong1, strong2 = self.strong(weak), self.strong(weak)
            box1, box2 = cutmix_box(self.crop, self.cutmix_p), cutmix_box(self.crop, self.cutmix_p)
        sample = {
            "weak": normalize(weak),
            "strong1": normalize(strong1),
            "strong2": normalize(strong2),
            "padding": padding[0] == 255,
            "box1": box1,
            "box2": box2,
        }
        if truth:
            sample["truth"] = truth[0][0].long()
        return sample


class EvalDataset(_Samples):
    """Whole validation images, normalised, with their labels."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": normalize(self.image(index)), "label": self.mask(index).long(), "index": index}


class ShardedSampler(Sampler[Key]):
    """This rank's ``per_rank`` keys of an epoch, drawn from reshuffled passes over the dataset.

    The epoch's sequence is one permutation after another until every rank has ``per_rank``
    samples (a small labeled set repeats); rank r takes positions r, r + world, ... Each key
    carries a seed derived from (seed, stream, epoch, position). ``stream`` separates samplers
    over the same data (the unlabeled batch and its CutMix partner batch).
    """

    def __init__(self, size: int, per_rank: int, *, rank: int = 0, world: int = 1, seed: int = 0, stream: int = 0):
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.per_rank, self.rank, self.world = size, per_rank, rank, world
        self.seed, self.stream = seed, stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.stream * 10_007 + self.epoch) % 2**63)
        total = self.per_rank * self.world
        passes = -(-total // self.size)
        order = torch.cat([torch.randperm(self.size, generator=gen) for _ in range(passes)])[:total]
        seeds = torch.randint(0, 2**62, (total,), generator=gen)
        positions = range(self.rank, total, self.world)
        return iter([(int(order[p]), int(seeds[p])) for p in positions])


def eval_indices(size: int, rank: int, world: int) -> list[int]:
    """Each val image exactly once across ranks, so summed confusion matrices count it once."""
    return list(range(rank, size, world))


def size_grouped_batches(rows: list[dict], indices: list[int], batch_size: int) -> list[list[int]]:
    """Batches of val images that share a size (whole images batch only when equal in size)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i in indices:
        groups.setdefault((rows[i]["height"], rows[i]["width"]), []).append(i)
    return [group[k : k + batch_size] for group in groups.values() for k in range(0, len(group), batch_size)]
