#!/usr/bin/env python3
"""Plots of a `typeface experiment` result folder (metrics.json):

  plots/scores-k<K>.png  each measure per style and arm, 95 % interval whiskers
  plots/loss-k<K>.png    each arm's fine-tune loss, mean over styles and seeds
  plots/router-usage.png (multi-style) each style's mean router weights per
                         branch and depth group, and their entropy
  plots/frontier-font.png, plots/frontier-character.png (frontier) style fit
                         against retention: each arm's points, its upper
                         envelope with a 95 % band, the matched retention

Usage: plot.py RESULTS_DIR   (e.g. results/few-shot)
"""
import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MEASURES = [
    ("alignment", "alignment"),
    ("style_fit", "style fit"),
    ("retention", "retention (character)"),
    ("font_kept", "retention (font)"),
    ("output_error", "output error vs teacher (lower is better)"),
]


def scores_plot(metrics, shots, results, out):
    arms = [arm["label"] for arm in metrics["arms"]]
    if "teacher" in results["means"]:  # distill: the students' reference
        arms.append("teacher")
    styles = metrics["styles"]
    groups = styles + ["all styles"]
    measures = [m for m in MEASURES if m[0] in results["means"][arms[0]]]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.flatten()
    for ax in axes[len(measures) + 1:]:
        ax.axis("off")
    width = 0.8 / len(arms)
    for ax, (key, title) in zip(axes, measures):
        for a, arm in enumerate(arms):
            if key not in results["means"][arm]:
                continue  # the teacher's output error: 0 by definition
            means, low, high = [], [], []
            for style in styles:
                cell = results["per_style"][style][arm][key]
                means.append(cell["mean"])
                low.append(cell["mean"] - cell["low"])
                high.append(cell["high"] - cell["mean"])
            cell = results["means"][arm][key]
            means.append(cell["mean"])
            low.append(cell["mean"] - cell["low"])
            high.append(cell["high"] - cell["mean"])
            xs = [g + (a - (len(arms) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=arm)
        ax.set_title(title)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=30, ha="right")
        if key != "output_error":
            ax.set_ylim(0, 1)
    ax = axes[len(measures)]
    for a, arm in enumerate(arms):
        if arm not in results["fid"]:
            continue  # the teacher: one model's images, no comparable FID
        xs = [g + (a - (len(arms) - 1) / 2) * width for g in range(len(styles))]
        ax.bar(xs, results["fid"][arm], width, label=arm)
    ax.set_title("FID to real renders (lower is better)")
    ax.set_xticks(range(len(styles)))
    ax.set_xticklabels(styles, rotation=30, ha="right")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metrics['setting']}, K = {shots}: mean and 95 % interval over seeds and prompts")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def loss_plot(metrics, shots, out):
    curves = defaultdict(lambda: defaultdict(list))
    for run in metrics["runs"]:
        if run["shots"] == shots:
            for step, loss in run["loss"]:
                curves[run["arm"]][step].append(loss)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, by_step in curves.items():
        steps = sorted(by_step)
        ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], label=arm)
    ax.set_xlabel("fine-tune step")
    ax.set_ylabel("diffusion loss (every 10th step)")
    ax.set_title(f"{metrics['setting']}, K = {shots}: mean over styles and seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def router_plot(usage, out):
    styles = list(usage)
    groups = list(usage[styles[0]]["depth"])
    fig, axes = plt.subplots(
        1, len(styles), figsize=(2.2 * len(styles) + 1, 0.28 * len(groups) + 2),
        sharey=True, squeeze=False)
    for ax, style in zip(axes[0], styles):
        depth = usage[style]["depth"]
        weights = [depth[g]["weights"] for g in groups]
        image = ax.imshow(weights, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(style, fontsize=9)
        ax.set_xticks(range(len(weights[0])))
        ax.set_xticklabels([str(j + 1) for j in range(len(weights[0]))])
        ax.set_xlabel("branch")
        for row, g in enumerate(groups):
            ax.text(len(weights[0]) - 0.5, row, f" {depth[g]['entropy']:.2f}",
                    va="center", fontsize=6)
    axes[0][0].set_yticks(range(len(groups)))
    axes[0][0].set_yticklabels(groups, fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean weight")
    fig.suptitle("router weights per style and depth (input to output; "
                 "right: entropy / log n)")
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def frontier_plot(metrics, on, title, out):
    curves = metrics["frontier"]["every_image"]["curves"][on]
    fig, ax = plt.subplots(figsize=(8, 6))
    lrs = metrics["lr_candidates"]
    markers = "os^vD"
    for a, arm in enumerate(metrics["arms"]):
        curve = curves["arms"][arm["label"]]
        color = f"C{a}"
        xs, ys = zip(*curve["envelope"])
        ax.plot(xs, ys, color=color, label=arm["label"])
        band = [(x, lo, hi) for x, lo, hi in
                zip(curves["band_x"], curve["band_low"], curve["band_high"])
                if lo is not None and hi is not None]
        if band:
            bx, lo, hi = zip(*band)
            ax.fill_between(bx, lo, hi, color=color, alpha=0.15, linewidth=0)
        per_lr = len(curve["points"]) // len(lrs)
        for i, (x, y) in enumerate(curve["points"]):
            ax.scatter(x, y, color=color, marker=markers[(i // per_lr) % len(markers)],
                       s=18, label=f"lr {lrs[i // per_lr]:g}" if a == 0 and i % per_lr == 0 else None)
    ax.scatter(*curves["base"], color="black", marker="*", s=80, label="base model")
    ax.axvline(curves["matched"], color="gray", linestyle=":", label="matched retention")
    ax.set_xlabel(title)
    ax.set_ylabel("style fit")
    ax.set_title(f"style fit against {title}: upper envelopes over lr and strength, 95 % bands")
    ax.legend(fontsize=8)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main():
    folder = Path(sys.argv[1])
    metrics = json.loads((folder / "metrics.json").read_text())
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    if metrics["setting"] == "frontier":
        frontier_plot(metrics, "font_kept", "retention (font)", plots / "frontier-font.png")
        frontier_plot(metrics, "retention", "retention (character)",
                      plots / "frontier-character.png")
        print(f"plots in {plots}")
        return
    for shots, results in metrics["results"].items():
        scores_plot(metrics, shots, results, plots / f"scores-k{shots}.png")
        loss_plot(metrics, int(shots), plots / f"loss-k{shots}.png")
    if "router_usage" in metrics:
        router_plot(metrics["router_usage"], plots / "router-usage.png")
    print(f"plots in {plots}")


if __name__ == "__main__":
    main()
