"""The study runner end to end on a two-arm, one-seed, tens-of-steps study: the report's numbers are the ones MLflow
recorded, and an interrupted study does not redo finished runs."""
import json
import re
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from igdit.config import ConfigError
from igdit.study.runner import run_study
from igdit.study.spec import StudySpec

from helpers import REPO


def _study(tmp_path: Path, digits_root: Path, **changes) -> Path:
    base = yaml.safe_load((REPO / "experiments/default.yaml").read_text())
    base["data"]["root"] = str(digits_root)
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base))
    study = {
        "name": "tiny", "base": str(base_path), "results": str(tmp_path / "results"), "seeds": [0],
        "steps": 20, "evaluate_every": 10, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "evaluation": {"num_samples": 40, "sampler": "euler", "steps": 2, "heatmap_scales": [1.0, 2.0],
                       "heatmap_intervals": [[0.0, 1.0], [0.3, 1.0]]},
        "probe": {"block": 2, "t": 0.3, "train_samples": 200},
        "arms": {"plain": {"set": {"model.backbone.init_args.exits": [],
                                   "model.terms": {"diffusion": {"class_path": "igdit.objectives.DiffusionLoss"}}}},
                 "ig_head": {}},
    } | changes
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.slow
def test_a_two_arm_study_reports_what_mlflow_recorded_and_resumes_without_redoing(tmp_path, digits_root):
    path = _study(tmp_path, digits_root)
    report = run_study(StudySpec.load(str(path)))
    text = report.read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igdit-reproduction").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`igdit.role` = 'study'")
    children = client.search_runs([experiment], filter_string="tags.`igdit.role` = 'training'")
    assert {r.data.tags["igdit.arm"] for r in children} == {"plain", "ig_head"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
               for r in children)
    # claim 1's table holds the FD the runs' FIDCallback logged at their last step
    for child in children:
        logged = client.get_metric_history(child.info.run_id, "fd_digits/none")
        final = [m.value for m in logged if m.step + 1 == 20][0]
        assert f"{final:.3g}" in text, (child.data.tags["igdit.arm"], final)
    assert "| 1. The exit head speeds up training |" in text and "inconclusive" in text  # one seed: no spread
    assert "**not run**" in text  # claims whose arms this study does not have
    assert parent.data.tags["claim.1"] == "inconclusive"
    plots = {p.name for p in (report.parent / "plots").iterdir()}
    assert {"claim1-curves.png", "claim3-heatmap.png", "claim2-bars.png"} <= plots
    images = re.findall(r"\(plots/([^)]+)\)", text)
    assert images and all(name in plots for name in images)

    done = sorted((tmp_path / "results" / "full" / "runs").glob("*/done.json"))
    stamps = {p: p.stat().st_mtime_ns for p in done}
    again = run_study(StudySpec.load(str(path)))  # an interrupted or repeated study: nothing is trained again
    assert all(p.stat().st_mtime_ns == stamps[p] for p in done)
    assert len(client.search_runs([experiment], filter_string="tags.`igdit.role` = 'training'")) == 2
    assert len(client.search_runs([experiment], filter_string="tags.`igdit.role` = 'study'")) == 1
    assert again.read_text().split("\n", 3)[3:] == text.split("\n", 3)[3:]  # the same numbers, read back


def test_a_study_file_is_checked_when_it_loads(tmp_path, digits_root, monkeypatch):
    bad = [({"arms": {"st": {"set": {"x": "${checkpoint:teacher}"}}}}, "arms.st.set"),
           ({"steps": 25}, "steps"),
           ({"seeds": [0, 0]}, "seeds"),
           ({"quick": {"arms": ["nope"]}}, "quick.arms"),
           ({"evaluation": {"sampler": "ddim"}}, "evaluation.sampler")]
    for change, field in bad:
        with pytest.raises(ConfigError, match=f"^{re.escape(field)}"):
            StudySpec.load(str(_study(tmp_path, digits_root, **change)), quick="quick" in change)
    monkeypatch.chdir(REPO)  # the shipped study names its base relative to the repository, where make runs
    spec = StudySpec.load("experiments/studies/reproduce.yaml")
    assert list(spec.arms).index("st_teacher") < list(spec.arms).index("st")  # a teacher trains before its student
    assert spec.arm_steps("st_teacher") == spec.steps // 2 and len(spec.seeds) >= 3
    quick = StudySpec.load("experiments/studies/reproduce.yaml", quick=True)
    assert "st_teacher" in quick.arms and len(quick.seeds) == 1


def test_a_study_trains_seed_by_seed_and_a_first_pass_over_some_seeds_lands_where_the_whole_study_reads(
        tmp_path, digits_root, monkeypatch):
    from igdit.study.runner import Study

    path = str(_study(tmp_path, digits_root, seeds=[0, 1, 2]))
    with pytest.raises(ConfigError, match=r"^--seeds"):
        StudySpec.load(path, seeds=[3])
    first, whole = StudySpec.load(path, seeds=[1]), StudySpec.load(path)
    assert first.seeds == [1] and first.results == whole.results  # the same runs folder: read back later
    trained = []
    monkeypatch.setattr(Study, "train", lambda self, arm, seed: trained.append((arm, seed)) or {})
    Study(whole).train_all()
    # every arm with seed 0 before any arm with seed 1: a study stopped early already covers every arm
    assert trained == [(arm, seed) for seed in (0, 1, 2) for arm in whole.arms]
