"""Draw the book's overview figure of HiT from a generator configuration.

    .venv/bin/python scripts/draw_overview.py [PRESET] [--out PATH]

PRESET is a name of `hitlib.config.PRESETS` (default `hit-b-256`); the figure is
written to `notebooks/figures/hit_overview.png` unless `--out` says otherwise. Every
stage, resolution, width, head count, block size and attention kind is read from the
configuration, so rerunning the script keeps the figure true when a preset changes.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from hitlib.config import get_config

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "notebooks" / "figures" / "hit_overview.png"
LOW, HIGH, LATENT, IMAGE = "#dbe8f6", "#fbe3cc", "#e4f2dc", "#f0e6f6"
PURPLE = "#7a3c8a"
ATTENTION_NAMES = {
    "multi_axis": "multi-axis",
    "full": "full",
    "axial": "axial",
    "blocked_local": "blocked local",
    "interleaved": "interleaved",
}


def box(ax, x, y, w, h, text, colour, size=10, weight="normal"):
    "A rounded box whose lower-left corner is (x, y), with centred text."
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=colour,
            edgecolor="#555555",
            linewidth=1,
        )
    )
    ax.text(
        x + w / 2,
        y + h / 2,
        text,
        ha="center",
        va="center",
        fontsize=size,
        fontweight=weight,
        linespacing=1.3,
    )


def arrow(ax, start, end, text=None, colour="#333333", style="-|>", offset=(0, 0.12)):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=12,
            color=colour,
            linewidth=1.2,
            shrinkA=0,
            shrinkB=0,
        )
    )
    if text:
        mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        ax.text(*mid, text, ha="center", va="bottom", fontsize=8.5, color=colour)


def stage_text(stage):
    "The lines of one stage's box."
    lines = [f"stage {stage.index + 1}", f"{stage.resolution}²×{stage.width}"]
    if stage.is_low_resolution:
        kind = ATTENTION_NAMES.get(stage.attention, stage.attention)
        lines += [
            f"{stage.num_layers} × {kind}",
            "attention",
            f"p={stage.block_size}, h={stage.num_heads}",
        ]
    else:
        lines += [f"{stage.num_layers} × MLP", "block", "→ to-RGB"]
    return "\n".join(lines)


def draw(config, out: Path):
    "Draw `config`'s generator into `out`; coordinates are inches of the figure."
    stages = config.stages
    n = len(stages)
    box_w, gap, box_h = 1.12, 0.42, 1.75
    z_w, first_gap = 0.8, 0.6
    xs = [z_w + first_gap + i * (box_w + gap) for i in range(n)]
    width, height = max(xs[-1] + box_w + 1.15, 5.6), 4.9
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    y0, mid = 1.55, 1.55 + 1.75 / 2  # bottom and middle of the stage boxes

    # z, the initial 8×8 map and the latent embedding Z
    box(
        ax,
        0.05,
        mid - 0.35,
        z_w - 0.05,
        0.7,
        f"z\n{config.latent_dim}",
        "#eeeeee",
        10,
        "bold",
    )
    arrow(ax, (z_w, mid), (xs[0], mid))
    ax.text(
        (z_w + xs[0]) / 2, mid + 0.06, "Linear", ha="center", va="bottom", fontsize=8.5
    )
    if config.cross_attention:
        tokens, grid = config.latent_grid**2, config.latent_grid
        z_y = y0 + box_h + 0.55
        z_text = (
            f"latent embedding Z: {tokens} tokens ({grid}×{grid}) of width "
            f"{config.widths[0]}; every stage cross-attends to it"
        )
        if n < 5:  # a short bar: two lines
            z_text = z_text.replace("; ", ";\n")
        box(ax, xs[0], z_y, xs[-1] + box_w - xs[0], 0.5, z_text, LATENT, 10)
        arrow(ax, (z_w / 2, mid + 0.35), (z_w / 2, z_y + 0.25), style="-")
        arrow(ax, (z_w / 2, z_y + 0.25), (xs[0], z_y + 0.25))
        for x in xs:
            arrow(
                ax, (x + box_w / 2, z_y), (x + box_w / 2, y0 + box_h), colour="#3c7a2e"
            )

    # the stages and the transitions between them
    for i, (x, stage) in enumerate(zip(xs, stages)):
        colour = LOW if stage.is_low_resolution else HIGH
        box(ax, x, y0, box_w, box_h, stage_text(stage), colour, 10)
        if i + 1 < n:
            arrow(ax, (x + box_w, mid), (x + box_w + gap, mid))
            ax.text(
                x + box_w + gap / 2,
                mid + 0.06,
                "PS",
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
            if stage.needs_transition_dense:
                ax.text(
                    x + box_w + gap / 2,
                    mid - 0.06,
                    "+L",
                    ha="center",
                    va="top",
                    fontsize=8.5,
                )

    # the image path of the high-resolution stages
    high = [(x, s) for x, s in zip(xs, stages) if not s.is_low_resolution]
    img_y = 0.75
    for j, (x, stage) in enumerate(high):
        arrow(ax, (x + box_w / 2, y0), (x + box_w / 2, img_y + 0.5), colour=PURPLE)
        text = (
            f"RGB {stage.resolution}²"
            if j == 0
            else f"up(I) + RGB\n{stage.resolution}²"
        )
        box(ax, x, img_y, box_w, 0.5, text, IMAGE, 9)
        if j + 1 < len(high):
            arrow(
                ax,
                (x + box_w, img_y + 0.25),
                (high[j + 1][0], img_y + 0.25),
                colour=PURPLE,
            )
    if high:
        end = high[-1][0] + box_w
        arrow(ax, (end, img_y + 0.25), (end + 0.3, img_y + 0.25), colour=PURPLE)
        ax.text(
            end + 0.33,
            img_y + 0.25,
            f"image\n{config.resolution}²×3",
            va="center",
            fontsize=9,
            fontweight="bold",
        )

    # the key, bottom left
    key = [
        (LOW, "low resolution: self-attention on blocks of p×p"),
        (HIGH, "high resolution: MLP blocks only (an implicit function)"),
    ]
    for k, (colour, text) in enumerate(key):
        y = 1.0 - 0.3 * k
        box(ax, 0.1, y - 0.09, 0.25, 0.18, "", colour)
        ax.text(0.45, y, text, va="center", fontsize=9)
    notes = "every stage: + position embedding, then cross-attention to Z"
    if not config.cross_attention:
        notes = "every stage: + position embedding (no cross-attention)"
    ax.text(0.1, 0.4, notes, va="center", fontsize=9)
    ax.text(
        0.1,
        0.15,
        "PS: pixel shuffle (2× resolution, C/4 channels); +L: Linear to the next width",
        va="center",
        fontsize=9,
    )
    ax.text(
        width / 2,
        height - 0.15,
        f"HiT generator, preset '{config.name}'",
        ha="center",
        va="top",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", default="hit-b-256")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    print(draw(get_config(args.preset), args.out))


if __name__ == "__main__":
    main()
