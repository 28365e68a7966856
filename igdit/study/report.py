"""REPRODUCTION.md and its plots, written from the claims (nothing typed in by hand), and the same into MLflow."""
from __future__ import annotations

import textwrap
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


def _title(fig, ax, text: str, size: float = 10) -> None:
    """A title wrapped to the figure's width (a claim's title is a sentence), so that none of it is cut off."""
    characters = max(20, int(fig.get_figwidth() * 72 / (0.55 * size)) - 6)
    ax.set_title(textwrap.fill(text, characters), fontsize=size)


def _better(label: str, direction: str) -> str:
    """The axis label, saying which way is better (unless it does already)."""
    return label if "better" in label or "helps" in label else f"{label} ({direction} is better)"


def _text_colour(rgba) -> str:
    """Black or white, whichever reads on a cell of colour ``rgba`` (its relative luminance, sRGB weights)."""
    red, green, blue = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3])
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.179 else "white"


def claim_figures(claim: Claim) -> dict[str, "plt.Figure"]:
    """A claim's figures by file stem (``claim3-heatmap``): curves (mean ± standard error over seeds), bars, a
    heat-map, probe curves; laid out so that every title, tick label and legend lies inside the figure."""
    figures = {}
    if claim.curves:
        fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
        for label, series in claim.curves.items():
            _band(ax, series, label)
        ax.set(xlabel="training step", ylabel=_better(claim.curve_label, "lower"))
        ax.set_yscale("log")
        _title(fig, ax, f"Claim {claim.key}: {claim.title}")
        ax.legend(fontsize=8, loc="best", ncols=2 if len(claim.curves) > 4 else 1)
        figures[f"claim{claim.key}-curves"] = fig
    if claim.probe_curves:
        fig, ax = plt.subplots(figsize=(7, 4.4), layout="constrained")
        for label, series in claim.probe_curves.items():
            _band(ax, series, label)
        ax.set(xlabel="training step", ylabel="linear-probe accuracy on val (higher is better)")
        _title(fig, ax, f"Claim {claim.key}: {claim.title} (linear probe)")
        ax.legend(fontsize=8, loc="best")
        figures[f"claim{claim.key}-probe"] = fig
    if claim.bars:
        labels = list(claim.bars)
        fig, ax = plt.subplots(figsize=(max(5.5, 0.9 * len(labels) + 2.5), 4.6), layout="constrained")
        stats = [estimate(claim.bars[k]) for k in labels]
        ax.bar(range(len(labels)), [e.mean for e in stats], yerr=[e.se or 0.0 for e in stats], capsize=4)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        if any(e.mean < 0 for e in stats):
            ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylabel(_better(claim.bar_label, "lower"))
        _title(fig, ax, f"Claim {claim.key}: {claim.title}")
        figures[f"claim{claim.key}-bars"] = fig
    if claim.heatmap:
        h = claim.heatmap
        values = np.array(h["values"], dtype=float)
        fig, ax = plt.subplots(figsize=(1.3 * len(h["columns"]) + 3.2, 0.6 * len(h["rows"]) + 2.4),
                               layout="constrained")
        image = ax.imshow(values, cmap="viridis_r", aspect="auto")  # cells fill the figure, not a square
        ax.set_xticks(range(len(h["columns"])), h["columns"])
        ax.set_yticks(range(len(h["rows"])), h["rows"])
        best = np.unravel_index(np.nanargmin(values), values.shape) if np.isfinite(values).any() else None
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                        color=_text_colour(image.cmap(image.norm(values[i, j]))),
                        fontweight="bold" if best == (i, j) else "normal")
        ax.set(xlabel="IG interval [t_low, t_high] (t = 1 noise)", ylabel="IG scale")
        _title(fig, ax, f"Claim {claim.key}: FD over IG scale x interval (best in bold)")
        fig.colorbar(image, ax=ax, label="FD (lower is better)")
        figures[f"claim{claim.key}-heatmap"] = fig
    return figures


def plot_claim(claim: Claim, folder: Path) -> list[Path]:
    """The claim's figures as PNG files in ``folder``."""
    return [_save(fig, folder / f"{stem}.png") for stem, fig in claim_figures(claim).items()]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(study, claims: list[Claim], seconds: float, provenance: dict) -> Path:
    """REPRODUCTION.md in the study's results folder, with its plots, measurements.csv and protocol.json beside it."""
    spec, folder = study.spec, study.folder
    plots = {claim.key: plot_claim(claim, folder / "plots") for claim in claims}
    e, p = spec.evaluation, spec.probe
    command = f"igdit reproduce {spec.path}{' --quick' if spec.quick else ''}" + (
        f" --seeds '{spec.seeds}'" if spec.seeds_subset else "") + (
        f" --arms '{list(spec.arms)}'" if spec.arms_subset else "")
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
    by_file: dict[str, list[tuple[str, int]]] = {}
    for (arm, seed), record in study.records.items():
        if record.get("imported"):
            by_file.setdefault(record["imported"], []).append((arm, seed))
    if by_file:
        sources = "; ".join(
            f"{len(runs)} runs ({len({a for a, _ in runs})} arms × seed(s) "
            f"{', '.join(map(str, sorted({s for _, s in runs})))}) from `{path}`, trained at "
            f"{study.records[runs[0]]['commit']}" for path, runs in by_file.items())
        lines += [f"**Runs measured by another invocation.** {sources}. Their FD curves, sampling evaluations and "
                  "probes are read from that file as measured there (`--measurements`; the protocol.json beside it "
                  "matches this study file's), not recomputed; this invocation trained and evaluated the rest.", ""]
    if spec.seeds_subset or spec.arms_subset:
        lines += [f"**A part of the study.** This report covers {len(spec.arms)} arm(s) × {len(spec.seeds)} seed(s) of "
                  f"the study file's; a claim whose arms were not trained says so. Nothing it tests was chosen from "
                  "its numbers: the subset only leaves arms or seeds out, and the whole study reads these runs back.",
                  ""]
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
    for name in ("measurements.csv", "protocol.json"):  # the numbers, and what they were measured under
        if (folder / name).is_file():
            study.client.log_artifact(study.parent_id, str(folder / name))
    study.client.log_artifacts(study.parent_id, str(folder / "plots"), artifact_path="plots")
    for claim in claims:
        study.client.set_tag(study.parent_id, f"claim.{claim.key}", claim.verdict)
    return path
