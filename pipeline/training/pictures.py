"""The evaluation grid: a row per val image, titled columns and a legend of the class colours shown."""

from __future__ import annotations

import io

import torch

from data_prep.palette import voc_palette

COLUMNS = ("image", "ground truth", "prediction", "reconstruction")
VOID = 255


def has_matplotlib() -> bool:
    """Whether matplotlib, which draws the picture grids and the quality charts, can be imported here: a
    machine with torch alone (a lent GPU one, say) may lack it."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def colorize(label: torch.Tensor) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) palette colours in [0, 1]."""
    palette = torch.tensor(voc_palette(), dtype=torch.float32).view(256, 3) / 255
    return palette[label.long().clamp(0, 255).cpu()].permute(2, 0, 1)


def grid_figure(rows: list[dict], classes: list[str], has_head: bool):
    """A matplotlib Figure of ``rows`` (each: image (3, H, W) in [0, 1], label and pred (H, W), recon
    (3, H, W) or None), with column titles and a legend of the classes that appear in it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    from matplotlib.patches import Patch

    palette = torch.tensor(voc_palette(), dtype=torch.float32).view(256, 3) / 255
    shown = set().union(*(set(row["label"].unique().tolist()) | set(row["pred"].unique().tolist()) for row in rows))
    handles = [Patch(facecolor=palette[i].tolist(), edgecolor="0.4", label=classes[i]) for i in sorted(shown)
               if i < len(classes)]  # fmt: skip
    if VOID in shown:
        handles.append(Patch(facecolor=palette[VOID].tolist(), edgecolor="0.4", label="void (not scored)"))
    columns = 4
    legend_rows = -(-len(handles) // columns)
    tile, title, legend = 1.6, 0.45, 0.15 + 0.22 * legend_rows  # inches
    height = len(rows) * tile + title + legend
    fig = Figure(figsize=(columns * tile, height), dpi=100)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - title / height, bottom=legend / height, wspace=0.04, hspace=0.04)
    titles = list(COLUMNS)
    titles[3] = "reconstruction\n(patch-masked input)" if has_head else "reconstruction\n(no MIM head)"
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, row in enumerate(rows):
        recon = row["recon"] if row["recon"] is not None else torch.ones_like(row["image"])
        for c, picture in enumerate((row["image"], colorize(row["label"]), colorize(row["pred"]), recon)):
            ax = axes[r][c]
            ax.imshow(picture.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    return fig


def figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
