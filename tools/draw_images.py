"""Draws the README's pictures of the three methods into images/ (matplotlib, no external assets).

    python tools/draw_images.py
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "images")
FROZEN, TRAINED, DATA = "#d9d9d9", "#f4a261", "#8ecae6"


def box(ax, x, y, w, h, text, color, size=9):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.05", fc=color, ec="#444"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#444"))


def legend(ax, y=-0.55):
    box(ax, 0.0, y, 0.5, 0.3, "frozen", FROZEN, 8)
    box(ax, 0.7, y, 0.5, 0.3, "trained", TRAINED, 8)


def canvas(title, width=6.0, height=6.0):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_axis_off()
    ax.set_title(title, fontsize=11)
    return fig, ax


def draw_freeze():
    fig, ax = canvas("Freeze: only the last layers train")
    box(ax, 0.5, 0.0, 3.0, 0.5, "embeddings", FROZEN)
    for i, name in enumerate(["layers.0", "layers.1", "...", "layers.22", "layers.23", "...", "layers.27"]):
        trained = name in ("layers.23", "...", "layers.27") and i >= 4
        box(ax, 0.5, 0.8 + i * 0.62, 3.0, 0.48, name, TRAINED if trained else FROZEN)
    box(ax, 0.5, 0.8 + 7 * 0.62, 3.0, 0.5, "final norm + lm_head", FROZEN)
    ax.text(3.7, 0.8 + 5 * 0.62, "--num_trainable_layers 5\n(the last five of 28)", fontsize=9, va="center")
    legend(ax)
    ax.set_xlim(-0.2, 6.2)
    ax.set_ylim(-0.7, 6.0)
    return fig


def draw_ptuning():
    fig, ax = canvas("P-Tuning: a trained prompt, the model frozen", width=9.0, height=5.2)
    # left: P-Tuning v2, prefix keys/values in every layer
    ax.text(1.6, 4.55, "P-Tuning v2 (default)", ha="center", fontsize=10, weight="bold")
    for i in range(4):
        y = 0.6 + i * 0.9
        box(ax, 1.3, y, 2.2, 0.6, f"layer {['0', '1', '...', '27'][i]}", FROZEN)
        box(ax, 0.0, y + 0.05, 0.9, 0.5, "prefix K,V", TRAINED, 8)
        arrow(ax, (0.9, y + 0.3), (1.3, y + 0.3))
    box(ax, 1.3, -0.2, 2.2, 0.5, "input tokens", DATA)
    ax.text(0.45, 0.05, "prefix encoder\n(MLP with\n--prefix_projection)", ha="center", va="center", fontsize=7.5)
    # right: embedding-only soft prompt
    ax.text(6.6, 4.55, "--prompt_embedding_only (P-Tuning v1)", ha="center", fontsize=10, weight="bold")
    for i in range(4):
        box(ax, 5.6, 0.6 + i * 0.9, 2.2, 0.6, f"layer {['0', '1', '...', '27'][i]}", FROZEN)
    box(ax, 5.0, -0.2, 1.1, 0.5, "soft prompt", TRAINED, 8)
    box(ax, 6.3, -0.2, 1.6, 0.5, "input tokens", DATA)
    arrow(ax, (6.6, 0.3), (6.6, 0.6))
    arrow(ax, (5.55, 0.3), (6.0, 0.6))
    ax.set_xlim(-0.3, 8.5)
    ax.set_ylim(-0.9, 4.9)
    box(ax, 0.0, -0.85, 0.6, 0.3, "frozen", FROZEN, 8)
    box(ax, 0.8, -0.85, 0.6, 0.3, "trained", TRAINED, 8)
    return fig


def draw_lora():
    fig, ax = canvas("LoRA: a low-rank update beside query_key_value", width=6.5, height=4.8)
    box(ax, 1.5, 0.0, 3.0, 0.5, "x  (hidden 4096)", DATA)
    box(ax, 0.3, 1.3, 2.4, 1.2, "W  query_key_value\n4096 x 12288", FROZEN)
    box(ax, 3.4, 1.0, 1.8, 0.55, "A  4096 x r", TRAINED)
    box(ax, 3.4, 2.2, 1.8, 0.55, "B  r x 12288", TRAINED)
    box(ax, 1.5, 3.5, 3.0, 0.5, "W x + (alpha / r) B A x", DATA)
    arrow(ax, (2.3, 0.5), (1.5, 1.3))
    arrow(ax, (3.7, 0.5), (4.3, 1.0))
    arrow(ax, (4.3, 1.55), (4.3, 2.2))
    arrow(ax, (1.5, 2.5), (2.4, 3.5))
    arrow(ax, (4.3, 2.75), (3.6, 3.5))
    ax.text(5.35, 1.9, "r = --lora_r (8)\nalpha = 32\nB starts at 0", fontsize=8.5, va="center")
    legend(ax, -0.75)
    ax.set_xlim(-0.2, 6.6)
    ax.set_ylim(-0.9, 4.3)
    return fig


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, draw in [("freeze", draw_freeze), ("ptuning", draw_ptuning), ("lora", draw_lora)]:
        fig = draw()
        fig.savefig(os.path.join(OUT, f"{name}.png"), dpi=110, bbox_inches="tight")
        plt.close(fig)
        print(os.path.join(OUT, f"{name}.png"))


if __name__ == "__main__":
    main()
