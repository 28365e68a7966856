"""Every plot igdit writes reads at its saved size: each drawn text (titles, tick labels, axis labels, legends, cell
values) lies inside the figure, heat-map values are written in the colour that reads on their cell, axes say which
way is better, the sweep's contour shows the two most important parameters, sample grids name rows and columns."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _drawn_texts(fig) -> list:
    """The text artists a draw puts on the canvas (tick labels only of ticks inside the view)."""
    texts = list(fig.texts)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            span = (high - low) * 1e-6
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                location = tick.get_loc()
                if location is not None and low - span <= location <= high + span:
                    texts += [tick.label1, tick.label2]
            texts.append(axis.label)
        texts += [ax.title, *ax.texts]
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def _outside(fig) -> list[str]:
    fig.canvas.draw()  # runs the layout engine, as savefig does
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    out = []
    for text in _drawn_texts(fig):
        box = text.get_window_extent(renderer)
        if box.x0 < frame.x0 - 0.5 or box.y0 < frame.y0 - 0.5 or box.x1 > frame.x1 + 0.5 or box.y1 > frame.y1 + 0.5:
            out.append(f"{text.get_text()!r} at {box.bounds} outside {frame.bounds}")
    tight = fig.get_tightbbox(renderer)  # everything drawn, in inches
    if tight.x0 < -0.01 or tight.y0 < -0.01 or tight.x1 > fig.get_figwidth() + 0.01 or \
            tight.y1 > fig.get_figheight() + 0.01:
        out.append(f"drawn area {tight.bounds} exceeds the {fig.get_size_inches()} figure")
    return out


def _claim():
    from igdit.study.claims import Claim

    rng = np.random.default_rng(0)
    arms = ["plain", "ig_head", "repa", "sra", "layersync", "dispersive", "st_teacher_broadcast"]
    claim = Claim("7", "Self-Transcendence: a student guided by its own shallow blocks and a VAE-aligned teacher "
                       "trains faster than the plain model, at every step we evaluated", "paper")
    claim.curves = {arm: {step: list(150 * np.exp(-step / 300) * rng.uniform(0.8, 1.2, 3))
                          for step in (200, 400, 600, 800)} for arm in arms}
    claim.probe_curves = {arm: {step: list(rng.uniform(0.6, 0.9, 3)) for step in (200, 400, 800)} for arm in arms[:3]}
    claim.bars = {f"{arm} with a long setting name {i}": list(rng.uniform(5, 30, 3)) for i, arm in enumerate(arms)}
    claim.heatmap = {"rows": ["w 1", "w 1.5", "w 2", "w 3"], "columns": ["[0, 1]", "[0.3, 1]", "[0.5, 1]", "[0, 0.7]"],
                     "values": [[19.9] * 4, [15.3, 15.6, 16.6, 16.6], [12.7, 12.9, 14.2, 14.3], [11.5, 11.0, 11.6, 12.1]]}
    return claim


def test_the_study_figures_keep_their_text_inside_and_say_what_is_better():
    from igdit.study.report import claim_figures

    figures = claim_figures(_claim())
    assert set(figures) == {"claim7-curves", "claim7-probe", "claim7-bars", "claim7-heatmap"}
    for name, fig in figures.items():
        assert _outside(fig) == [], name
    assert "lower is better" in figures["claim7-curves"].axes[0].get_ylabel()
    assert "higher is better" in figures["claim7-probe"].axes[0].get_ylabel()
    assert "lower is better" in figures["claim7-bars"].axes[0].get_ylabel()
    assert "Self-Transcendence" in figures["claim7-curves"].axes[0].get_title()  # wrapped, not cut
    heatmap = figures["claim7-heatmap"].axes[0]
    colours = {text.get_text(): text.get_color() for text in heatmap.texts}
    # viridis_r: the highest FD is dark purple (white text), the lowest bright yellow (black text)
    assert colours["19.9"] == "white" and colours["11"] == "black"
    assert [t.get_fontweight() for t in heatmap.texts if t.get_text() == "11"] == ["bold"]  # the best cell
    for fig in figures.values():
        plt.close(fig)


def test_a_claim_without_some_plots_draws_only_the_others(tmp_path):
    from igdit.study.claims import Claim
    from igdit.study.report import plot_claim

    claim = Claim("2", "IG sampling improves a trained model at no extra NFE", "paper")
    claim.bars = {"w = 1": [19.0, 20.1, 21.0], "IG w = 2": [12.0, 12.9, 13.1]}
    paths = plot_claim(claim, tmp_path)
    assert [p.name for p in paths] == ["claim2-bars.png"] and paths[0].stat().st_size > 1000


@pytest.fixture(scope="module")
def study():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["fd_digits/ig"])

    def objective(trial):
        scale = trial.suggest_float("guidance.ig.scale", 1.0, 3.5)
        low = trial.suggest_float("guidance.ig.interval.low", 0.0, 0.6)
        high = trial.suggest_float("guidance.ig.interval.high", 0.5, 1.0)
        return 10 + 4 * (scale - 2.5) ** 2 + 0.3 * low + 0.01 * high

    study.optimize(objective, n_trials=16)
    return study


def test_the_sweep_plots_keep_their_text_inside_and_the_contour_shows_the_two_that_matter(study):
    from igdit.sweeps.report import most_important, sweep_figures

    names = ["guidance.ig.scale", "guidance.ig.interval.low", "guidance.ig.interval.high"]
    figures = sweep_figures(study, names)
    assert set(figures) == {"history", "importances", "contour"}
    assert most_important(study, names)[0] == "guidance.ig.scale"
    for name, make in figures.items():
        fig = make("matplotlib")
        assert _outside(fig) == [], name
        if name == "contour":  # one panel: the two most important parameters, not a grid of every pair
            panels = [ax for ax in fig.axes if ax.get_xlabel()]
            assert len(panels) == 1
            assert {panels[0].get_xlabel(), panels[0].get_ylabel()} == set(most_important(study, names))
        if name == "history":
            assert "fd_digits/ig (lower is better)" in fig.axes[0].get_ylabel()
        plt.close(fig)
    html = figures["history"]("plotly")
    assert html.layout.yaxis.title.text == "fd_digits/ig (lower is better)"


def test_sample_grids_name_their_rows_and_columns():
    import torch

    from igdit.images import image_grid

    blocks = [torch.full((10, 2, 1, 8, 8), 128, dtype=torch.uint8) for _ in range(2)]
    plain = np.asarray(image_grid(blocks, upscale=4).convert("L"))
    labelled = np.asarray(image_grid(blocks, upscale=4, row_labels=[f"class {i}" for i in range(10)],
                                     block_labels=["no guidance", "IG w = 2"]).convert("L"))
    top = labelled.shape[0] - plain.shape[0]
    left = labelled.shape[1] - plain.shape[1]
    assert top > 8 and left > 20
    assert (labelled[top:, left:] == plain).all()  # the samples themselves are untouched
    assert labelled[:top, left:].min() < 100 and labelled[top:, :left].min() < 100  # text in both bands
    rows = [labelled[top + 2 + i * 34: top + 2 + (i + 1) * 34 - 2, :left].min() < 100 for i in range(10)]
    assert all(rows)  # a label beside every row
