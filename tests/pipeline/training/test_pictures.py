"""The evaluation grid reads without the docs: titled columns and a legend naming the colours shown."""

from __future__ import annotations

import torch
from torchvision.io import decode_png

from pipeline.training.pictures import COLUMNS, figure_png, grid_figure

CLASSES = ["background", "red disc", "striped square", "dotted triangle"]


def _rows(n: int, with_recon: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        label = torch.randint(0, 3, (40, 48), generator=gen)  # classes 0-2 only
        label[:2] = 255  # a void border
        rows.append({"image": torch.rand(3, 40, 48, generator=gen), "label": label,
                     "pred": torch.randint(0, 2, (40, 48), generator=gen),
                     "recon": torch.rand(3, 40, 48, generator=gen) if with_recon else None})  # fmt: skip
    return rows


def _texts(fig) -> tuple[list[str], list[str]]:
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    (legend,) = fig.legends
    return titles, [text.get_text() for text in legend.get_texts()]


def test_columns_are_titled_and_the_legend_names_the_classes_shown():
    fig = grid_figure(_rows(3, with_recon=True), CLASSES, has_head=True)
    titles, legend = _texts(fig)
    assert [t.split("\n")[0] for t in titles] == list(COLUMNS)  # once, above the first row
    assert legend == ["background", "red disc", "striped square", "void (not scored)"]  # not the unseen class
    assert len(fig.axes) == 3 * 4


def test_a_model_without_reconstruction_head_says_so_and_the_png_decodes():
    fig = grid_figure(_rows(2, with_recon=False), CLASSES, has_head=False)
    titles, _ = _texts(fig)
    assert "no MIM head" in titles[3]
    png = decode_png(torch.frombuffer(bytearray(figure_png(fig)), dtype=torch.uint8))
    channels, height, width = png.shape
    assert width == 4 * 160 and height > 2 * 160  # the rows, the titles above and the legend below
