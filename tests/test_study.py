"""The study runner end to end on a two-arm, one-seed, tens-of-steps study: the report's numbers are the ones MLflow
recorded, and an interrupted study does not redo finished runs."""
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
def test_a_two_arm_study_reports_what_mlflow_recorded_and_resumes_without_redoing(tmp_path, digits_root, capsys):
    import sys

    path = _study(tmp_path, digits_root)
    report = run_study(StudySpec.load(str(path)), out=sys.stdout)
    text = report.read_text()
    said = capsys.readouterr().out
    # progress: each run's steps with an ETA, the evaluations counted against the plan
    assert re.search(r"^plain seed 0: step 10/20 \(50%\), [\dhms]+, ETA [\dhms]+", said, re.M), said
    planned = int(re.search(r"^evaluating: (\d+) evaluation\(s\) to compute: ", said, re.M).group(1))
    assert planned >= 1 and len(re.findall(rf"^  evaluation \d+/{planned}: \S", said, re.M)) == planned, said
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igdit-reproduction").experiment_id
    (parent,) = client.search_runs([experiment], filter_string="tags.`igdit.role` = 'study'")
    children = client.search_runs([experiment], filter_string="tags.`igdit.role` = 'training'")
    assert {r.data.tags["igdit.arm"] for r in children} == {"plain", "ig_head"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
               for r in children)
    for run in [parent, *children]:  # provenance on the parent and on every training run
        assert run.data.tags["versions.igdit"] and run.data.tags["versions.torch"]
    assert all(r.data.params["trainer/max_steps"] == "20" and r.data.params["seed_everything"] == "0"
               for r in children)
    # claim 1's table holds the FD the runs' FIDCallback logged at their last step
    for child in children:
        logged = client.get_metric_history(child.info.run_id, "fd_digits/none")
        final = [m.value for m in logged if m.step + 1 == 20][0]
        assert f"{final:.3g}" in text, (child.data.tags["igdit.arm"], final)
    assert "| 1. The exit head speeds up training |" in text and "inconclusive" in text  # one seed: no spread
    assert "One seed decides nothing" in text and "at commit " in text and "torch " in text
    assert "**not run**" in text  # claims whose arms this study does not have
    assert parent.data.tags["claim.1"] == "inconclusive"
    # every number in a CSV beside the report: both runs' curves at both evaluations, and the sampled settings
    import csv

    rows = list(csv.DictReader(open(report.parent / "measurements.csv")))
    curve = {(r["arm"], r["step"]) for r in rows if r["metric"] == "fd_digits" and r["setting"] == "none"}
    assert curve == {(arm, step) for arm in ("plain", "ig_head") for step in ("10", "20")}
    assert {r["setting"] for r in rows if r["metric"] == "sampled_fd"} >= {"none", "ig", "w2.3 [0.3,1]", "w2.3 [0,1]"}
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
    with pytest.raises(ConfigError, match=r"^claims.where_ig_acts.scale: 'best' is not allowed; comparisons are fixed "
                                          r"before the runs"):
        StudySpec.load(str(_study(tmp_path, digits_root, claims={"where_ig_acts": {"scale": "best"}})))
    with pytest.raises(ConfigError, match=r"^claims.where_ig_acts.against"):
        StudySpec.load(str(_study(tmp_path, digits_root, claims={"where_ig_acts": {"against": [0.3, 1.0]}})))
    with pytest.raises(ConfigError, match=r"^alpha"):
        StudySpec.load(str(_study(tmp_path, digits_root, alpha=0.7)))
    monkeypatch.chdir(REPO)  # the shipped study names its base relative to the repository, where make runs
    spec = StudySpec.load("experiments/studies/reproduce.yaml")
    order = list(spec.arms)
    for teacher, student in (("st_teacher", "st"), ("st_teacher_broadcast", "st_broadcast")):
        assert order.index(teacher) < order.index(student)  # a teacher trains before its student
        assert spec.arm_steps(teacher) == spec.arm_steps(student) // 2  # ST: 40 epochs of stage 1 for 80 of stage 2
    assert len(spec.seeds) >= 5 and spec.evaluate_every <= 250
    for arm in ("plain", "ig_head", "ig_accel", "ig_accel_x0"):  # the claims about speed run past the steep part
        assert spec.arm_steps(arm) >= 1500
    assert spec.claims.where_ig_acts.scale == 2.3 and spec.claims.where_ig_acts.interval == (0.3, 1.0)
    quick = StudySpec.load("experiments/studies/reproduce.yaml", quick=True)
    assert list(quick.arms) == ["plain", "ig_head"] and len(quick.seeds) == 1 and quick.arm_steps("plain") >= 1500


def test_a_study_trains_seed_by_seed_and_a_first_pass_over_some_seeds_lands_where_the_whole_study_reads(
        tmp_path, digits_root, monkeypatch):
    from igdit.study.runner import Study

    path = str(_study(tmp_path, digits_root, seeds=[0, 1, 2]))
    with pytest.raises(ConfigError, match=r"^--seeds"):
        StudySpec.load(path, seeds=[3])
    first, whole = StudySpec.load(path, seeds=[1]), StudySpec.load(path)
    assert first.seeds == [1] and first.results == whole.results  # the same runs folder: read back later
    with pytest.raises(ConfigError, match=r"^--arms: 'ig' is not allowed; expected arms of the study: (plain|ig_head), "):
        StudySpec.load(path, only_arms=["ig"])
    part = StudySpec.load(path, seeds=[0, 1], only_arms=["ig_head"])
    assert list(part.arms) == ["ig_head"] and part.arms_subset and part.results == whole.results
    assert not whole.arms_subset and not whole.seeds_subset
    trained = []
    monkeypatch.setattr(Study, "train", lambda self, arm, seed: trained.append((arm, seed)) or {})
    Study(whole).train_all()
    # every arm with seed 0 before any arm with seed 1: a study stopped early already covers every arm
    assert trained == [(arm, seed) for seed in (0, 1, 2) for arm in whole.arms]


def test_a_run_is_claimed_by_one_live_process_and_taken_over_from_a_dead_one(tmp_path, digits_root):
    import os
    import subprocess
    import sys

    from igdit.study.runner import Study

    study = Study(StudySpec.load(str(_study(tmp_path, digits_root))))
    assert study._claim("plain", 0)  # this process holds it now
    assert not study._claim("plain", 0)  # ... and nobody else gets it while it lives
    claim = study.run_folder("plain", 0) / "claim"
    assert claim.read_text() == str(os.getpid())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claim.write_text(str(gone.pid))  # a worker that was killed holding the run
    assert study._claim("plain", 0) and claim.read_text() == str(os.getpid())


@pytest.mark.slow
def test_two_workers_train_every_run_once_and_the_report_reads_them_back(tmp_path, digits_root):
    from igdit.cli import main

    path = _study(tmp_path, digits_root, seeds=[0, 1], steps=10, evaluate_every=10)
    assert main(["reproduce", str(path), "--workers", "2", "--train_only"]) == 0
    runs = tmp_path / "results" / "full" / "runs"
    done = sorted(p.parent.name for p in runs.glob("*/done.json"))
    assert done == ["ig_head-seed0", "ig_head-seed1", "plain-seed0", "plain-seed1"]
    assert not list(runs.glob("*/claim"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("igdit-reproduction").experiment_id
    assert len(client.search_runs([experiment], filter_string="tags.`igdit.role` = 'training'")) == 4
    assert not (tmp_path / "results" / "full" / "REPRODUCTION.md").exists()
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/done.json")}
    assert main(["reproduce", str(path)]) == 0  # the report: nothing trained again
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert (tmp_path / "results" / "full" / "REPRODUCTION.md").is_file()


@pytest.mark.slow
def test_seeds_measured_by_another_invocation_give_the_report_one_invocation_gives(tmp_path, digits_root, capsys):
    """The read-back of another invocation's measurements.csv is exact: a study that has seed 1 and reads seed 0 from
    the file writes the same tables as the study that trained both; a protocol that differs is refused."""
    import csv
    import shutil

    from igdit.cli import main

    def study(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        return _study(folder, digits_root, seeds=[0, 1], **changes)

    def tables(report: Path) -> str:  # the report from its first table on (the header names commits and times)
        text = report.read_text()
        return text[text.index("| claim |"):]

    def rows(folder: Path) -> set[tuple]:
        return {tuple(r.values()) for r in csv.DictReader(open(folder / "measurements.csv"))
                if r["metric"] != "train_seconds"}

    whole = study("whole")
    assert main(["reproduce", str(whole)]) == 0  # both seeds trained and evaluated here
    whole_out = tmp_path / "whole" / "results" / "full"
    # seed 0 as another machine would hand it over: its rows only, with the protocol they were measured under
    handed = tmp_path / "handed"
    handed.mkdir()
    with open(whole_out / "measurements.csv") as source, open(handed / "measurements.csv", "w", newline="") as out:
        reader = csv.DictReader(source)
        writer = csv.DictWriter(out, fieldnames=reader.fieldnames)
        writer.writeheader()
        writer.writerows(r for r in reader if r["seed"] == "0")
    shutil.copy(whole_out / "protocol.json", handed / "protocol.json")

    part = study("part")
    part_out = tmp_path / "part" / "results" / "full"
    for run in ("plain-seed1", "ig_head-seed1"):  # seed 1 trained here (the same runs: no training twice)
        shutil.copytree(whole_out / "runs" / run, part_out / "runs" / run)
    assert main(["reproduce", str(part), "--measurements", f"[{handed / 'measurements.csv'}]"]) == 0
    assert sorted(p.name for p in (part_out / "runs").iterdir()) == ["ig_head-seed1", "plain-seed1"]  # seed 0 read
    assert tables(part_out / "REPRODUCTION.md") == tables(whole_out / "REPRODUCTION.md")
    assert rows(part_out) == rows(whole_out)  # the combined CSV: seed 0 as measured there, seed 1 trained here
    header = (part_out / "REPRODUCTION.md").read_text().split("| claim |")[0]
    assert re.search(r"Runs measured by another invocation\.\*\* 2 runs \(2 arms × seed\(s\) 0\) from `.*handed/"
                     r"measurements\.csv`, trained at [0-9a-f]{40}", header), header

    def refused(path: Path) -> str:
        capsys.readouterr()
        assert main(["reproduce", str(path), "--measurements", f"[{handed / 'measurements.csv'}]"]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    other = study("other", probe={"block": 2, "t": 0.5, "train_samples": 200})
    assert re.match(r"^error: --measurements: .* was measured with probe\.t = 0\.3, this study has 0\.5; numbers of "
                    r"another protocol are not pooled$", refused(other))
    (handed / "protocol.json").unlink()
    assert re.match(r"^error: --measurements: .* has no protocol\.json beside it", refused(part))


def test_a_run_trained_here_cannot_read_the_checkpoint_of_a_run_given_as_measurements(tmp_path, digits_root):
    from igdit.study.measurements import ImportedRuns
    from igdit.study.runner import Study

    arms = {"guide": {"budget": 0.5}, "guided": {"set": {"model.guide": "${checkpoint:guide}"}}}
    spec = StudySpec.load(str(_study(tmp_path, digits_root, arms=arms)))
    imported = ImportedRuns()
    imported.records[("guide", 0)] = {"last": f"{ImportedRuns.PREFIX}other.csv#guide/0/10", "imported": "other.csv"}
    study = Study(spec, imported=imported)
    assert study.finished("guide", 0) and not study.finished("guided", 0)
    study.records[("guide", 0)] = study.train("guide", 0)  # read, not trained
    with pytest.raises(ConfigError, match=r"^--measurements: 'other\.csv' is not allowed; gives guide seed 0 as "
                                          r"measurements only, but guided trains here and reads its checkpoint"):
        study.experiment("guided", 0, "run-id")
    with pytest.raises(ConfigError, match=r"^--measurements: .* guides with a run given as measurements only"):
        study.fd("here.ckpt", {"ag": {"ag": {"ckpt": study.records[("guide", 0)]["last"]}}}, 0)
