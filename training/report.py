"""Figures and the markdown report of `evaluate` (and the tables of `ablate`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

METRIC_ROWS = [
    ("PixCorr", "pixcorr", "mean"),
    ("SSIM", "ssim", "mean"),
    ("2-way identification, VDVAE latents", "two_way_vdvae", None),
    ("2-way identification, CLIP-Vision", "two_way_clip", None),
    ("frame identification within 1 s", "frame_id_1s", None),
]


def _value(section: dict, key: str, sub: str | None):
    if key not in section:
        return None
    v = section[key]
    return v[sub] if sub else v


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_markdown(path: Path, report: dict) -> None:
    """A readable report: the metric table (model | shuffled spikes | chance) and the gallery."""
    s = report["split"]
    lines = [
        f"# Evaluation of `{report['bundle']}`",
        "",
        f"- movie `{report['movie']}`, areas {', '.join(report['areas'])}, {report['n_units']} units, profile `{report['profile']}`",
        f"- split **{s['name']}**: {s['n_train']} training / {report['n_test']} test presentations (single-trial decoding)",
        "",
        "| metric | model | shuffled spikes | chance |",
        "|---|---|---|---|",
    ]
    for label, key, sub in METRIC_ROWS:
        model = _value(report["model"], key, sub)
        if model is None:
            continue
        chance = report["chance"].get(key)
        lines.append(f"| {label} | {_fmt(model)} | {_fmt(_value(report['shuffled'], key, sub))} | "
                     f"{'—' if chance is None else _fmt(chance)} |")
    lines += ["", f"_{report['feature_metrics']}_", "",
              "Shuffled spikes: the same model fed the test presentations' counts permuted across time.",
              "SSIM has no fixed chance level: compare with the shuffled control.", "",
              "## Gallery: best, median and worst previews by PixCorr", "", "![gallery](gallery.png)", ""]
    if report.get("refined"):
        lines.append(f"Refined column: Versatile Diffusion image-to-image, {report['refined']['steps']} steps.")
        if report["profile"] == "tiny":
            lines.append("With the `tiny` profile Versatile Diffusion has random weights (no image prior), so "
                         "the refined column shows the pipeline running, not a refinement; the `paper` "
                         "profile's published weights give the real one.")
    Path(path).write_text("\n".join(lines) + "\n")


def write_gallery(path: Path, truth: np.ndarray, previews: np.ndarray, refined: np.ndarray | None,
                  titles: list[str]) -> None:
    """Rows of ground truth | preview | refined (the seed paper's figures 5 and 6)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3 if refined is not None else 2
    n = len(truth)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        panels = [truth[i], previews[i]] + ([refined[i]] if refined is not None else [])
        for j, image in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([]); ax.set_yticks([])
            if i == 0:
                ax.set_title(["ground truth", "preview (VDVAE)", "refined (VD)"][j], fontsize=9)
        axes[i, 0].set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
