"""Layout faults matplotlib can measure: text that runs into other text.

``overlapping_text(fig)`` draws the figure and returns every pair of visible texts
(tick labels, axis labels, titles, legend entries, free text) whose bounding boxes
on the canvas intersect, such as "-0.0050.0000" from two x tick labels or a figure
title over a panel title. A rotated text's axis-aligned box is larger than its
glyphs, so rotated texts are left out.
"""
from __future__ import annotations


def _texts(fig):
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            # only the ticks inside the view are drawn; the locator's others keep stale labels
            lo, hi = sorted(axis.get_view_interval())
            slack = (hi - lo) * 1e-9
            for tick in axis.get_major_ticks():
                if lo - slack <= tick.get_loc() <= hi + slack:
                    yield from (tick.label1, tick.label2)
            yield axis.label
            yield axis.get_offset_text()
        yield from (ax.title, ax._left_title, ax._right_title)
        yield from ax.texts
        if ax.get_legend() is not None:
            yield from ax.get_legend().get_texts()
    yield from fig.texts
    if fig._suptitle is not None:
        yield fig._suptitle
    for legend in fig.legends:
        yield from legend.get_texts()


def overlapping_text(fig, tolerance_px: float = 1.0) -> list[tuple[str, str]]:
    """Pairs of texts of ``fig`` that overlap by more than ``tolerance_px`` pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes, seen = [], set()
    for text in _texts(fig):
        if id(text) in seen:  # the figure title is in fig.texts too
            continue
        seen.add(id(text))
        if not text.get_visible() or not text.get_text().strip() or text.get_rotation() % 90:
            continue
        box = text.get_window_extent(renderer)
        if box.width > 0 and box.height > 0:
            boxes.append((text.get_text(), box.expanded(1.0, 1.0).padded(-tolerance_px)))
    return [(a, b) for i, (a, box_a) in enumerate(boxes) for b, box_b in boxes[i + 1:] if box_a.overlaps(box_b)]
