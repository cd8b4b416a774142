"""Draw ``docs/flow.png``: the workflow's data flow and the package layers behind it.

    .venv/bin/python docs/make_flow_figure.py [--out docs/flow.png]

Top: the Snakemake rules (rounded, coloured by the sub-package that does the work) and the files
they read and write (square, under ``results/``). Bottom: the sub-packages in the order of the data
flow; a package imports only those to its left (``sim`` only ``io``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

COLOURS = {
    "io": "#4e79a7",
    "physics": "#f28e2b",
    "model": "#b07aa1",
    "training": "#e15759",
    "evaluation": "#59a14f",
    "pipeline": "#76b7b2",
    "cli": "#9c9c9c",
    "sim": "#9c755f",
}
FILE_FACE = "#ffffff"
EDGE = "#333333"
FONT = 11


@dataclass
class Box:
    """A labelled box: centre (x, y), width and height in data units (y grows downwards)."""

    x: float
    y: float
    w: float
    h: float

    def edge_towards(self, x: float, y: float) -> tuple[float, float]:
        """The point of the box's outline on the line from its centre towards (x, y)."""
        dx, dy = x - self.x, y - self.y
        if dx == 0 and dy == 0:
            return self.x, self.y
        # scale the direction until it leaves the rectangle through the nearer side
        sx = (self.w / 2) / abs(dx) if dx else float("inf")
        sy = (self.h / 2) / abs(dy) if dy else float("inf")
        s = min(sx, sy)
        return self.x + s * dx, self.y + s * dy


def draw_box(ax, box: Box, text: str, face: str, rule: bool, sub: str = "", dashed: bool = False) -> Box:
    """Draw a rule (rounded, coloured) or a file (square, white) with its label; return the box.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes in data units, y pointing down.
    box : Box
        Where the box goes.
    text : str
        Main label (rule name or file path).
    face : str
        Fill colour.
    rule : bool
        True for a rule (rounded corners, bold label), False for a file.
    sub : str
        Smaller second line (the module that does the work).
    dashed : bool
        Dashed outline (for what runs only in the embedded default).
    """
    style = "round,pad=0.02,rounding_size=0.15" if rule else "square,pad=0.02"
    patch = FancyBboxPatch(
        (box.x - box.w / 2, box.y - box.h / 2),
        box.w,
        box.h,
        boxstyle=style,
        facecolor=face,
        edgecolor=EDGE,
        linewidth=1.2,
        linestyle="--" if dashed else "-",
    )
    ax.add_patch(patch)
    weight = "bold" if rule else "normal"
    family = "sans-serif" if rule else "monospace"
    if sub:
        ax.text(box.x, box.y - 0.12, text, ha="center", va="center", fontsize=FONT, weight=weight, family=family)
        ax.text(box.x, box.y + 0.17, sub, ha="center", va="center", fontsize=FONT - 2.5, style="italic")
    else:
        ax.text(box.x, box.y, text, ha="center", va="center", fontsize=FONT - 1, weight=weight, family=family)
    return box


def arrow(ax, src: Box, dst: Box, dotted: bool = False) -> None:
    """An arrow from the outline of ``src`` to the outline of ``dst``."""
    start = src.edge_towards(dst.x, dst.y)
    end = dst.edge_towards(src.x, src.y)
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=14,
            color="#555555" if dotted else EDGE,
            linewidth=1.1,
            linestyle=(0, (2, 2)) if dotted else "-",
            shrinkA=2,
            shrinkB=2,
        )
    )


def rule(ax, x: float, y: float, name: str, package: str, module: str, dashed: bool = False, width: float = 1.9) -> Box:
    """A workflow rule coloured by its sub-package, with the module that does the work beneath."""
    return draw_box(ax, Box(x, y, width, 0.62), name, COLOURS[package], True, module, dashed)


def file(ax, x: float, y: float, text: str, width: float = 2.3) -> Box:
    """A file or folder the workflow writes or reads (one or two lines)."""
    height = 0.42 if "\n" not in text else 0.66
    return draw_box(ax, Box(x, y, width, height), text, FILE_FACE, False)


def draw_workflow(ax) -> None:
    """The rules and their files, library on the left, archive on the right, top to bottom."""
    lib_x, arc_x, left_x, mid_x = 1.4, 5.4, 0.2, 2.5
    sim = rule(ax, 3.4, 0.0, "simulate", "sim", "sim.simulate (embedded default only)", dashed=True, width=3.2)
    raw_lib = file(ax, lib_x, 1.1, "library/NIGHT/*.fits")
    raw_arc = file(ax, arc_x, 1.1, "archive/NIGHT/*.fits")
    arrow(ax, sim, raw_lib, dotted=True)
    arrow(ax, sim, raw_arc, dotted=True)
    ext_lib = rule(ax, lib_x, 2.1, "extract_library", "pipeline", "pipeline.extract")
    ext = rule(ax, arc_x, 2.1, "extract", "pipeline", "pipeline.extract")
    lib_shard = file(ax, lib_x, 3.1, "library/NIGHT.h5")
    shard = file(ax, arc_x, 3.15, "shards/NIGHT.h5\n.quarantine.csv  .ignored.csv", width=3.0)
    for a, b in ((raw_lib, ext_lib), (ext_lib, lib_shard), (raw_arc, ext), (ext, shard)):
        arrow(ax, a, b)
    baseline = rule(ax, left_x, 4.2, "baseline", "pipeline", "pipeline.baseline")
    physics = rule(ax, mid_x + 0.45, 4.2, "physics_fit", "physics", "physics.fit, one job per camera", width=2.4)
    masters = file(ax, left_x, 5.25, "masters.h5", width=1.5)
    phys = file(ax, mid_x + 0.45, 5.3, "physics/CAMERA.h5\n-> physics_merge -> physics.h5", width=2.8)
    train = rule(ax, mid_x + 0.45, 6.4, "train", "training", "training.loop (+ library shards)", width=2.6)
    model = file(ax, mid_x + 0.45, 7.45, "model/  model.safetensors\nmodel.json  physics.h5", width=2.6)
    for a, b in ((lib_shard, baseline), (lib_shard, physics), (baseline, masters), (physics, phys)):
        arrow(ax, a, b)
    for a, b in ((phys, train), (train, model)):
        arrow(ax, a, b)
    predict = rule(ax, arc_x + 0.5, 7.45, "predict", "pipeline", "pipeline.predict + model")
    preds = file(ax, arc_x + 0.5, 8.45, "predictions/NIGHT.h5")
    for a, b in ((shard, predict), (model, predict), (predict, preds)):
        arrow(ax, a, b)
    draw_outputs(ax, raw_arc, shard, masters, preds)


DY = 1.15  # the lower half sits below the library's fits


def draw_outputs(ax, raw_arc: Box, shard: Box, masters: Box, preds: Box) -> None:
    """Correction, QA and the summary (the lower half of the workflow)."""
    qa = rule(ax, 2.3, 8.4 + DY, "qa", "pipeline", "pipeline.qa + evaluation")
    correct = rule(ax, 5.4, 8.4 + DY, "correct", "pipeline", "pipeline.correct")
    for a, b in ((shard, qa), (masters, qa), (preds, qa), (preds, correct)):
        arrow(ax, a, b)
    # correct re-reads the raw frames (guide frames keep only their strips in the shard)
    x_side = 7.05
    ax.plot(
        [raw_arc.x + raw_arc.w / 2, x_side, x_side],
        [raw_arc.y, raw_arc.y, correct.y],
        color="#555555",
        linewidth=1.1,
        linestyle=(0, (2, 2)),
    )
    arrow(ax, Box(x_side, correct.y, 0.0, 0.0), correct, dotted=True)
    ax.text(
        x_side + 0.08, 4.6 + DY / 2, "raw frames re-read,\nhash checked", fontsize=FONT - 2.5, rotation=90, va="center"
    )
    qa_out = file(ax, 2.3, 9.45 + DY, "qa/NIGHT/qa.html  qa.csv\nquarantine.csv  fig*.png", width=3.0)
    corrected = file(ax, 5.4, 9.45 + DY, "corrected/NIGHT/*.fits\nmanifest.csv  status.json", width=2.9)
    summary = rule(ax, 3.85, 10.55 + DY, "summary", "pipeline", "pipeline.summary")
    out = file(ax, 3.85, 11.5 + DY, "summary.html  summary.csv  summary_table1.csv", width=5.4)
    for a, b in ((qa, qa_out), (correct, corrected), (qa_out, summary), (corrected, summary), (summary, out)):
        arrow(ax, a, b)


def draw_layers(ax, top: float) -> None:
    """The sub-packages in the order of the data flow, each importing only those to its left."""
    order = ["io", "physics", "model", "training", "evaluation", "pipeline", "cli"]
    step, y = 1.12, top + 0.95
    boxes = {}
    for k, name in enumerate(order):
        boxes[name] = draw_box(ax, Box(0.1 + k * step, y, 0.96, 0.5), name, COLOURS[name], True)
    for a, b in zip(order, order[1:]):
        arrow(ax, boxes[a], boxes[b])
    sim = draw_box(ax, Box(boxes["io"].x, y + 0.95, 0.96, 0.5), "sim", COLOURS["sim"], True)
    arrow(ax, boxes["io"], sim)
    ax.text(
        0.0,
        top + 0.2,
        "Sub-packages of deepdark/ in the order of the data flow (a package imports only those before it)",
        fontsize=FONT,
        weight="bold",
    )
    ax.text(
        boxes["model"].x - 0.5,
        y + 0.95,
        "sim (the simulator) imports only io;\nthe pipeline never imports it",
        fontsize=FONT - 1.5,
        va="center",
    )


def make_figure(out: Path) -> Path:
    """Draw the figure and write it to ``out`` (PNG); return the path."""
    fig, ax = plt.subplots(figsize=(9.6, 14.8))
    ax.set_xlim(-0.85, 7.6)
    ax.set_ylim(15.8, -0.9)  # y down: the flow reads top to bottom
    ax.axis("off")
    ax.text(-0.5, -0.65, "deepdark workflow: rules and the files under results/", fontsize=FONT + 1, weight="bold")
    draw_workflow(ax)
    draw_layers(ax, top=12.2 + DY)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("flow.png"))
    print(make_figure(parser.parse_args().out))


if __name__ == "__main__":
    main()
