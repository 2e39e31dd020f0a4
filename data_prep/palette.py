"""The Pascal VOC colour palette, used for the masks the project writes and reads."""

from __future__ import annotations


def voc_palette(n: int = 256) -> list[int]:
    """Flat [r0, g0, b0, r1, ...] palette: VOC's bit-interleaved colour map."""
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette
