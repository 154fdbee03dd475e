"""The `ablate` command: which visual areas carry the decodable information (the seed's figure 8).

For each area alone and all areas together, train and evaluate a bundle; because areas have
different unit counts, also at an equal number of units per area (randomly subsampled, seeded).
With several stage-1 models (`--stage1 vdvae vae`), every condition is run for each, so plain-VAE
and VDVAE previews can be compared side by side, in metrics and in `stage1_previews.png` (the
seed's figure 7).
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from spikevaediff.training.evaluate import evaluate
from spikevaediff.training.fit import TrainConfig, train

log = logging.getLogger(__name__)

AREAS = ("VISp", "VISl", "VISrl", "VISal", "VISpm", "VISam")
SUMMARY = (("pixcorr", "mean"), ("ssim", "mean"), ("two_way_vdvae", None), ("frame_id_1s", None))


def _metric(section, key, sub):
    v = section.get(key)
    return None if v is None else (v[sub] if sub else v)


def ablate(base: TrainConfig, out: Path, areas=AREAS, stage1s=("vdvae",), equal_units: bool = True,
           seed: int = 0) -> list[dict]:
    """Run every (stage-1 model, area set, unit budget) condition; write table.md, results.json, figure."""
    from spikevaediff.replay.nwb import open_session

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open_session(base.sessions[0]) as session:
        present = [a for a in areas if a in session.areas()]
        per_area = {a: len(session.units(areas=[a]).ids) for a in present}
    n_equal = min(per_area.values()) if per_area else 0
    conditions = [(a, [a], None) for a in present] + [("all", list(present), None)]
    if equal_units:
        conditions += [(f"{a} ({n_equal} units)", [a], n_equal) for a in present]
    rows = []
    for stage1 in stage1s:
        for label, area_list, n_units in conditions:
            tag = f"{stage1}-{label.split()[0]}" + (f"-eq{n_units}" if n_units else "")
            cfg = replace(base, areas=area_list, stage1=stage1, out=out / "bundles" / tag,
                          units_per_area=n_units, cache_dir=out / "targets-cache", seed=seed)
            log.info("ablation %s", tag)
            train(cfg)
            report = evaluate(cfg.out, base.sessions, out / "reports" / tag, n_refine=0, seed=seed,
                              weights_dir=base.profile.weights_dir)
            row = {"stage1": stage1, "condition": label, "areas": area_list, "n_units": report["n_units"]}
            for key, sub in SUMMARY:
                row[key] = _metric(report["model"], key, sub)
                row[key + "_shuffled"] = _metric(report["shuffled"], key, sub)
            row["frame_id_1s_chance"] = report["chance"]["frame_id_1s"]
            rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    write_table(out / "table.md", rows)
    plot_ablation(out / "ablation.png", rows)
    if len(stage1s) > 1:
        bundles = {s: out / "bundles" / f"{s}-all" for s in stage1s}
        compare_stage1_previews(out / "stage1_previews.png", bundles, base.sessions, base.profile.weights_dir, seed)
    return rows


def compare_stage1_previews(path: Path, bundles: dict, sessions, weights_dir, seed: int = 0, n: int = 6) -> None:
    """Ground truth beside each stage-1 model's single-trial previews of the same test presentations
    (the seed paper's figure 7: plain VAE vs VDVAE)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spikevaediff.core.bundle import load_bundle
    from spikevaediff.core.config import ModelProfile
    from spikevaediff.training import dataset
    from spikevaediff.training.evaluate import bundle_population, bundle_split, decode
    from spikevaediff.training.fit import STAGE1_SIZE, load_stage1
    from spikevaediff.training.population import movie_frames

    columns, truth = {}, None
    for name, bundle_dir in bundles.items():
        bundle = load_bundle(bundle_dir)
        m = bundle.manifest
        pop = bundle_population(bundle, sessions)
        test = np.flatnonzero(bundle_split(bundle, pop).test)
        picks = test[np.linspace(0, len(test) - 1, n).astype(int)]
        model, _ = load_stage1(ModelProfile(m.profile, weights_dir), m.models["stage1"]["arch"])
        columns[name] = decode(bundle, model, pop.counts[picks], seed).previews
        if truth is None:
            truth = dataset.square_frames(movie_frames(sessions, m.movie), STAGE1_SIZE)[pop.frames[picks]]
    names = ["ground truth"] + list(columns)
    fig, axes = plt.subplots(n, len(names), figsize=(2.1 * len(names), 2.1 * n), squeeze=False)
    for i in range(n):
        for j, name in enumerate(names):
            image = truth[i] if j == 0 else columns[name][i]
            axes[i, j].imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            axes[i, j].set_xticks([]); axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(name if j == 0 else f"{name} preview", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_table(path: Path, rows: list[dict]) -> None:
    lines = ["| stage 1 | areas | units | PixCorr (shuffled) | SSIM (shuffled) | 2-way VDVAE (shuffled) | frame id 1 s (chance) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage1']} | {r['condition']} | {r['n_units']} | {r['pixcorr']:.3f} ({r['pixcorr_shuffled']:.3f}) | "
                     f"{r['ssim']:.3f} ({r['ssim_shuffled']:.3f}) | {r['two_way_vdvae']:.3f} ({r['two_way_vdvae_shuffled']:.3f}) | "
                     f"{r['frame_id_1s']:.3f} ({r['frame_id_1s_chance']:.3f}) |")
    Path(path).write_text("\n".join(lines) + "\n")


def plot_ablation(path: Path, rows: list[dict]) -> None:
    """Bars per condition for each metric, shuffled control as a tick (the seed's figure 8)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("pixcorr", "PixCorr"), ("ssim", "SSIM"), ("two_way_vdvae", "2-way (VDVAE)"),
               ("frame_id_1s", "frame id within 1 s")]
    stage1s = sorted({r["stage1"] for r in rows}, key=lambda s: s != "vdvae")
    labels = list(dict.fromkeys(r["condition"] for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.5))
    width = 0.8 / len(stage1s)
    x = np.arange(len(labels))
    for ax, (key, title) in zip(axes, metrics):
        for k, stage1 in enumerate(stage1s):
            by = {r["condition"]: r for r in rows if r["stage1"] == stage1}
            vals = [by[l][key] if l in by else np.nan for l in labels]
            ctrl = [by[l][key + "_shuffled"] if l in by else np.nan for l in labels]
            pos = x + (k - (len(stage1s) - 1) / 2) * width
            ax.bar(pos, vals, width, label=stage1)
            ax.scatter(pos, ctrl, marker="_", color="k", s=120, zorder=3,
                       label="shuffled spikes" if k == 0 else None)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
