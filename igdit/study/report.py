"""REPRODUCTION.md and its plots, written from the claims (nothing typed in by hand), and the same into MLflow."""
from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from igdit.study.claims import Claim  # noqa: E402
from igdit.study.verdict import estimate, rule  # noqa: E402


def _band(ax, series: dict[int, list[float]], label: str) -> None:
    steps = sorted(series)
    stats = [estimate(series[s]) for s in steps]
    mean = np.array([e.mean for e in stats])
    se = np.array([e.se or 0.0 for e in stats])
    ax.plot(steps, mean, marker="o", label=label)
    ax.fill_between(steps, mean - se, mean + se, alpha=0.2)


def plot_claim(claim: Claim, folder: Path) -> list[Path]:
    """PNG files for a claim: curves (mean ± standard error over seeds), bars, a heat-map, probe curves."""
    paths = []
    if claim.curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, series in claim.curves.items():
            _band(ax, series, label)
        ax.set(xlabel="training step", ylabel=claim.curve_label, title=f"Claim {claim.key}: {claim.title}")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        paths.append(_save(fig, folder / f"claim{claim.key}-curves.png"))
    if claim.probe_curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, series in claim.probe_curves.items():
            _band(ax, series, label)
        ax.set(xlabel="training step", ylabel="linear-probe accuracy (val)", title=f"Claim {claim.key}: probe")
        ax.legend(fontsize=8)
        paths.append(_save(fig, folder / f"claim{claim.key}-probe.png"))
    if claim.bars:
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(claim.bars)), 4))
        labels = list(claim.bars)
        stats = [estimate(claim.bars[k]) for k in labels]
        ax.bar(range(len(labels)), [e.mean for e in stats], yerr=[e.se or 0.0 for e in stats], capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(ylabel=claim.bar_label, title=f"Claim {claim.key}: {claim.title}")
        paths.append(_save(fig, folder / f"claim{claim.key}-bars.png"))
    if claim.heatmap:
        h = claim.heatmap
        fig, ax = plt.subplots(figsize=(1.4 * len(h["columns"]) + 2, 0.6 * len(h["rows"]) + 2))
        values = np.array(h["values"])
        image = ax.imshow(values, cmap="viridis_r")
        ax.set_xticks(range(len(h["columns"])), h["columns"])
        ax.set_yticks(range(len(h["rows"])), h["rows"])
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", color="w", fontsize=8)
        ax.set(xlabel="IG interval [t_low, t_high] (t = 1 noise)", ylabel="IG scale",
               title=f"Claim {claim.key}: FD over IG scale x interval")
        fig.colorbar(image, ax=ax, label="FD (lower is better)")
        paths.append(_save(fig, folder / f"claim{claim.key}-heatmap.png"))
    return paths


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(study, claims: list[Claim], seconds: float, provenance: dict) -> Path:
    """REPRODUCTION.md in the study's results folder, with a plot folder and measurements.csv beside it."""
    spec, folder = study.spec, study.folder
    plots = {claim.key: plot_claim(claim, folder / "plots") for claim in claims}
    e, p = spec.evaluation, spec.probe
    command = f"igdit reproduce {spec.path}{' --quick' if spec.quick else ''}" + (
        f" --seeds '{spec.seeds}'" if spec.seeds_subset else "")
    commits = sorted({r.get("commit", "unknown") for r in study.records.values()})
    versions = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items())
    lines = [f"# Reproduction: {spec.name} ({'quick' if spec.quick else 'full'} study)", "",
             f"Written by `{command}` on {time.strftime('%Y-%m-%d')} at commit {provenance['commit']}; {versions}; "
             f"{provenance['machine']}. {seconds / 60:.0f} min of wall time for this invocation (runs finished "
             f"earlier are read back, not redone; the {len(study.records)} training runs took "
             f"{sum(r['seconds'] for r in study.records.values()) / 60:.0f} min in all, trained at "
             f"{', '.join(commits)}). Every number and plot below comes from the runs; rerunning regenerates them. "
             "Every measured value is in `measurements.csv` beside this report (arm, seed, step, setting, metric, "
             "value).", ""]
    if len(spec.seeds) == 1:
        lines += ["**One seed decides nothing.** With a single seed there is no spread to test against, so every "
                  "verdict below is inconclusive: read the numbers as a first look at the direction of each effect, "
                  "and run the full study (several seeds) before drawing any conclusion.", ""]
    lines += ["**Protocol.** Data: the digits of scikit-learn (8×8, pixel space), base experiment "
              f"`{spec.base}` (SiT-T/2 and its options); {len(spec.seeds)} seed(s) per arm "
              f"({', '.join(map(str, spec.seeds))}: model init, data order and sampling noise); arms train "
              f"{spec.steps} steps × their budget ("
              + ", ".join(f"{name} {spec.arm_steps(name)}" for name in spec.arms)
              + f"), evaluated every {spec.evaluate_every}; arms of different lengths are compared at the last step "
              "both reached. Fréchet distance `fd_digits` (a small CNN trained on the training split; not Inception "
              f"FID) of K = {e.num_samples} class-balanced samples against the training split, sampler {e.sampler} "
              f"with {e.steps} steps, EMA weights; IG scale {e.ig_scale:g}, CFG {e.cfg_scale:g} on "
              f"[{e.cfg_interval[0]:g}, {e.cfg_interval[1]:g}], Autoguidance {e.ag_scale:g}. Linear probe: logistic "
              f"regression on mean-pooled block-{p.block} tokens at t = {p.t:g} (null label), fit on {p.train_samples} "
              "training images, accuracy on the validation split.", "",
              f"**Verdict rule.** {rule(spec.alpha)[0].upper() + rule(spec.alpha)[1:]}. Tables give mean ± standard "
              "error over seeds; each comparison reads: difference (claimed side minus baseline) [95% CI] (test, "
              "degrees of freedom, one-sided p, Holm-adjusted p) → verdict.", "",
              "| claim | paper | ours | verdict |", "|---|---|---|---|"]
    for claim in claims:
        lines.append(f"| {claim.key}. {claim.title} | {claim.paper} | {claim.measured or '—'} | **{claim.verdict}** |")
    for claim in claims:
        lines += ["", f"## {claim.key}. {claim.title} — {claim.verdict}", "", f"*Paper:* {claim.paper}", ""]
        if claim.measured:
            lines += [f"*Measured:* {claim.measured}", ""]
        for title, rows in ([("", claim.rows)] if claim.rows else []) + claim.tables:
            lines += [f"*{title}*", ""] if title else []
            lines += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
            lines.append("")
        lines += [note for note in claim.notes] + ([""] if claim.notes else [])
        lines += [f"![claim {claim.key}](plots/{path.name})" for path in plots[claim.key]]
    path = folder / "REPRODUCTION.md"
    path.write_text("\n".join(lines) + "\n")
    study.client.log_artifact(study.parent_id, str(path))
    if (folder / "measurements.csv").is_file():
        study.client.log_artifact(study.parent_id, str(folder / "measurements.csv"))
    study.client.log_artifacts(study.parent_id, str(folder / "plots"), artifact_path="plots")
    for claim in claims:
        study.client.set_tag(study.parent_id, f"claim.{claim.key}", claim.verdict)
    return path
