"""Draw the chapters' diagrams as SVG files in book/figures/ (one per chapter of part I and II).

    python scripts/draw_figures.py            # writes book/figures/*.svg

Each chapter shows its file with a Markdown image. The drawings are schematic (boxes, arrows,
grids); no number in them is measured. Deterministic: SVG metadata dates and ids are fixed, so a
re-run changes no file unless the code changed (tests/test_book.py checks that).
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "book" / "figures"
BLUE, ORANGE, GREEN, GRAY, RED = "#dbe9f6", "#fde3c8", "#dff0d8", "#eeeeee", "#f4cccc"


def box(ax, x, y, w, h, text, color=BLUE, size=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=color, ec="#333333", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, a, b, color="#333333", style="-|>", lw=1.2, rad=0.0):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=color, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", shrinkA=0, shrinkB=0))


def plus(ax, x, y):
    ax.add_patch(Circle((x, y), 0.17, fc="white", ec="#333333", lw=1))
    ax.text(x, y, "+", ha="center", va="center", fontsize=11)


def residual_block(ax, x0, title, pre, names, colors):
    """One block as a column at x0: the residual stream on the left, the two sub-layers on the right."""
    ax.text(x0 + 0.6, 10.2, title, ha="center", fontsize=11, weight="bold")
    stream_x, branch_x = x0, x0 + 1.3
    y = 0.6
    box(ax, stream_x + 0.6, y, 2.4, 0.5, names["input"], GRAY, 8)
    y_prev = y + 0.25
    for sub, color in ((names["attn"], colors[0]), (names["mlp"], colors[1])):
        y_split, y_join = y_prev + 0.45, y_prev + 3.1
        arrow(ax, (stream_x, y_prev), (stream_x, y_join - 0.17), lw=2)
        arrow(ax, (stream_x, y_split), (branch_x, y_split + (0.45 if pre else 0.9)), rad=-0.3)
        if pre:
            box(ax, branch_x, y_split + 0.7, 1.9, 0.5, names["norm"], ORANGE, 8)
            arrow(ax, (branch_x, y_split + 0.95), (branch_x, y_split + 1.3))
            box(ax, branch_x, y_split + 1.65, 1.9, 0.6, sub, color, 8)
            arrow(ax, (branch_x, y_split + 1.95), (stream_x + 0.17, y_join), rad=0.3)
        else:
            box(ax, branch_x, y_split + 1.2, 1.9, 0.6, sub, color, 8)
            arrow(ax, (branch_x, y_split + 1.5), (stream_x + 0.17, y_join), rad=0.3)
        plus(ax, stream_x, y_join)
        y_prev = y_join + 0.17
        if not pre:
            arrow(ax, (stream_x, y_prev), (stream_x, y_prev + 0.25), lw=2)
            box(ax, stream_x, y_prev + 0.5, 1.2, 0.45, names["norm"], ORANGE, 8)
            y_prev += 0.72
    if pre:
        arrow(ax, (stream_x, y_prev), (stream_x, y_prev + 0.3), lw=2)
        box(ax, stream_x, y_prev + 0.55, 1.6, 0.45, "final " + names["norm"], ORANGE, 8)
        y_prev += 0.78
    arrow(ax, (stream_x, y_prev), (stream_x, y_prev + 0.35), lw=2)
    ax.text(stream_x, y_prev + 0.5, names["output"], ha="center", va="bottom", fontsize=8)


def blocks_2017_2024():
    fig, ax = plt.subplots(figsize=(9, 6.2))
    residual_block(ax, 0.6, "2017: post-norm", False,
                   dict(input="tokens + position vector", attn="multi-head\nattention", mlp="MLP, GELU\n(width 4d)",
                        norm="LayerNorm", output="to the next block / LM head (untied)"), (BLUE, GREEN))
    residual_block(ax, 5.6, "2024: pre-norm", True,
                   dict(input="tokens (no position vector)", attn="GQA attention\nRoPE on q, k", mlp="SwiGLU MLP\n(width 8d/3)",
                        norm="RMSNorm", output="to the next block / LM head (tied if small)"), (BLUE, GREEN))
    ax.text(4.6, 0.05, "thick line: the residual stream. Post-norm puts a norm on it after every sub-layer; "
            "pre-norm leaves it an identity path.", ha="center", fontsize=8, style="italic")
    return fig, ax, (-0.8, 9.6, -0.2, 10.6)


def norm_placement():
    fig, ax = plt.subplots(figsize=(8, 2.6))
    for x0, title, pre in ((0.3, r"post-norm: $x_{l+1} = N(x_l + F(x_l))$", False), (5.0, r"pre-norm: $x_{l+1} = x_l + F(N(x_l))$", True)):
        ax.text(x0 + 1.7, 2.25, title, ha="center", fontsize=10, weight="bold")
        ax.text(x0 - 0.05, 1.0, "$x_l$", ha="right", va="center", fontsize=11)
        arrow(ax, (x0, 1.0), (x0 + 2.45, 1.0), lw=2.2)
        if pre:
            box(ax, x0 + 0.9, 1.65, 0.7, 0.4, "N", ORANGE)
            box(ax, x0 + 1.8, 1.65, 0.7, 0.4, "F", BLUE)
            arrow(ax, (x0 + 0.3, 1.0), (x0 + 0.55, 1.6), rad=-0.3)
            arrow(ax, (x0 + 1.25, 1.65), (x0 + 1.45, 1.65))
            arrow(ax, (x0 + 2.15, 1.6), (x0 + 2.5, 1.17), rad=-0.3)
            plus(ax, x0 + 2.62, 1.0)
            arrow(ax, (x0 + 2.79, 1.0), (x0 + 3.5, 1.0), lw=2.2)
            ax.text(x0 + 1.7, 0.55, "the stream is never normalised:\nan identity path to every layer",
                    ha="center", fontsize=8, style="italic")
        else:
            box(ax, x0 + 1.35, 1.65, 0.7, 0.4, "F", BLUE)
            arrow(ax, (x0 + 0.3, 1.0), (x0 + 1.0, 1.6), rad=-0.3)
            arrow(ax, (x0 + 1.7, 1.6), (x0 + 2.5, 1.17), rad=-0.3)
            plus(ax, x0 + 2.62, 1.0)
            arrow(ax, (x0 + 2.79, 1.0), (x0 + 3.0, 1.0), lw=2.2)
            box(ax, x0 + 3.3, 1.0, 0.6, 0.4, "N", ORANGE)
            arrow(ax, (x0 + 3.6, 1.0), (x0 + 3.9, 1.0), lw=2.2)
            ax.text(x0 + 1.9, 0.55, "a norm on the stream\nafter every block", ha="center", fontsize=8, style="italic")
    return fig, ax, (-0.3, 9.3, 0.3, 2.5)


def rope_pair():
    import math

    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.add_patch(Circle((0, 0), 1, fill=False, ec="#999999", lw=1, ls="--"))
    theta, start = 0.55, 0.25
    for m in range(4):
        a = start + m * theta
        arrow(ax, (0, 0), (math.cos(a), math.sin(a)), color=f"C{m}", lw=2)
        ax.text(1.12 * math.cos(a), 1.12 * math.sin(a), f"position {m}", color=f"C{m}", ha="center", va="center", fontsize=9)
    ax.add_patch(matplotlib.patches.Arc((0, 0), 0.7, 0.7, theta1=math.degrees(start), theta2=math.degrees(start + theta), lw=1.2))
    ax.text(0.45 * math.cos(start + theta / 2), 0.45 * math.sin(start + theta / 2), r"$\omega_i$", fontsize=11, ha="center", va="center")
    ax.text(0, -1.32, r"pair $i$: features $(x_i, x_{i+D/2})$ of a query or key, rotated by $m\,\omega_i$ at position $m$;"
            "\n" r"$\omega_i = \theta^{-2i/D}$. A score $q_m \cdot k_n$ sees only the angle $(m-n)\,\omega_i$.",
            ha="center", va="top", fontsize=8.5)
    ax.axhline(0, color="#cccccc", lw=0.8)
    ax.axvline(0, color="#cccccc", lw=0.8)
    ax.set_aspect("equal")
    return fig, ax, (-1.45, 1.45, -1.75, 1.35)


def gqa_cache():
    fig, ax = plt.subplots(figsize=(9, 4.2))
    H, HKV = 8, 2
    g = H // HKV
    ax.text(2.3, 3.85, f"GQA: {H} query heads share {HKV} K/V heads (g = {g})", ha="center", fontsize=9.5, weight="bold")
    for h in range(H):
        x = 0.3 + h * 0.55
        box(ax, x, 3.1, 0.45, 0.45, f"q{h}", BLUE if h // g == 0 else GREEN, 8)
        arrow(ax, (x, 2.87), (0.3 + (h // g) * 2.2 + 0.8, 2.12), color="#777777", lw=0.8)
    for j in range(HKV):
        box(ax, 0.3 + j * 2.2 + 0.8, 1.85, 1.4, 0.5, f"K{j}, V{j}", BLUE if j == 0 else GREEN, 8)
    ax.text(2.3, 1.2, "each cached element is read once and serves g query heads", ha="center", fontsize=8.5, style="italic")
    # the cache tensor
    ax.text(7.0, 3.85, "one layer's cache: K, V [B, H_kv, T, D]", ha="center", fontsize=9.5, weight="bold")
    x0, y0, cw, ch = 5.2, 0.6, 0.28, 0.28
    for kv, dy in (("K", 1.65), ("V", 0.0)):
        for head in range(HKV):
            for t in range(10):
                for d in range(2):
                    new = t == 9
                    ax.add_patch(Rectangle((x0 + t * cw, y0 + dy + head * 0.7 + d * ch), cw, ch,
                                           fc=RED if new else (BLUE if head == 0 else GREEN), ec="white", lw=0.6))
            ax.text(x0 - 0.1, y0 + dy + head * 0.7 + ch, f"{kv}, head {head}", ha="right", va="center", fontsize=7.5)
    arrow(ax, (x0, y0 - 0.15), (x0 + 10 * cw, y0 - 0.15), lw=0.8)
    ax.text(x0 + 5 * cw, y0 - 0.3, "positions t = 0 .. T-1 (red: the token written this step)", ha="center", va="top", fontsize=7.5)
    ax.text(7.0, 0.05 - 0.2, "bytes = 2 x layers x B x T x H_kv x D x bytes per element", ha="center", va="top", fontsize=8.5)
    return fig, ax, (-0.2, 9.2, -0.55, 4.1)


def gated_mlp():
    fig, ax = plt.subplots(figsize=(8, 3.2))
    box(ax, 0.5, 1.5, 0.8, 0.5, "x  [d]", GRAY)
    box(ax, 2.4, 2.4, 1.5, 0.55, "W_gate  d x f", BLUE)
    box(ax, 2.4, 0.6, 1.5, 0.55, "W_up  d x f", BLUE)
    box(ax, 4.3, 2.4, 1.0, 0.5, "SiLU", ORANGE)
    ax.add_patch(Circle((5.5, 1.5), 0.22, fc="white", ec="#333333"))
    ax.text(5.5, 1.5, r"$\odot$", ha="center", va="center", fontsize=13)
    box(ax, 7.0, 1.5, 1.6, 0.55, "W_down  f x d", BLUE)
    arrow(ax, (0.9, 1.6), (1.65, 2.35), rad=-0.2)
    arrow(ax, (0.9, 1.4), (1.65, 0.65), rad=0.2)
    arrow(ax, (3.15, 2.4), (3.8, 2.4))
    arrow(ax, (4.8, 2.4), (5.38, 1.7), rad=-0.2)
    arrow(ax, (3.15, 0.6), (5.38, 1.3), rad=0.2)
    arrow(ax, (5.72, 1.5), (6.2, 1.5))
    arrow(ax, (7.8, 1.5), (8.4, 1.5))
    ax.text(8.45, 1.5, "y  [d]", va="center", fontsize=9)
    ax.text(4.4, 0.0, "three matrices of d x f (f = 8d/3 keeps the 8d^2 weights of a GELU MLP of width 4d); "
            "the gate multiplies the up projection elementwise", ha="center", fontsize=8, style="italic")
    return fig, ax, (0.0, 9.1, -0.25, 2.9)


def flash_tiles():
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    n = 8
    for i in range(n):
        for j in range(n):
            if j > i:
                color, hatch = GRAY, None
            elif j == i:
                color, hatch = ORANGE, "///"
            else:
                color, hatch = BLUE, None
            ax.add_patch(Rectangle((j, n - 1 - i), 1, 1, fc=color, ec="white", lw=1.5, hatch=hatch))
    ax.plot([0, n], [n, 0], color=RED.replace("cc", "44"), lw=1.5, ls="--")
    row = 5
    ax.add_patch(Rectangle((0, n - 1 - row), row + 1, 1, fill=False, ec="#d62728", lw=2.2))
    ax.text(n + 0.15, n - 0.5 - row, "one program: query block i,\nK/V blocks j = 0..i stream past it",
            va="center", fontsize=8.5, color="#d62728")
    ax.text(n / 2, n + 0.35, "key/value blocks j  ->", ha="center", fontsize=9)
    ax.text(-0.35, n / 2, "query blocks i  ->", rotation=-90, va="center", ha="center", fontsize=9)
    for label, color, hatch, y in (("computed in full", BLUE, None, -0.55), ("on the diagonal: computed, then masked", ORANGE, "///", -1.05),
                                   ("above the diagonal: skipped, never loaded", GRAY, None, -1.55)):
        ax.add_patch(Rectangle((0, y - 0.18), 0.4, 0.36, fc=color, ec="white", hatch=hatch))
        ax.text(0.55, y, label, va="center", fontsize=8.5)
    ax.set_aspect("equal")
    return fig, ax, (-0.7, n + 3.6, -1.9, n + 0.7)


FIGURES = {
    "ch01_blocks_2017_2024.svg": blocks_2017_2024,
    "ch02_norm_placement.svg": norm_placement,
    "ch03_rope_pair.svg": rope_pair,
    "ch04_gqa_cache.svg": gqa_cache,
    "ch05_gated_mlp.svg": gated_mlp,
    "ch06_flash_tiles.svg": flash_tiles,
}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "minigpt-book"  # stable ids, so re-drawing changes nothing
    for name, draw in FIGURES.items():
        fig, ax, (x0, x1, y0, y1) = draw()
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.axis("off")
        fig.savefig(OUT / name, format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
