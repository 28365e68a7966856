"""Running a study: every arm x seed trained through `igdit fit`'s own path, then the sampling and probing
evaluations on their checkpoints, each result kept on disk so an interrupted study continues where it stopped.

Layout under ``<results>/<full|quick>/``: ``runs/<arm>-seed<s>/`` (the run's config.yaml, its run folder and
checkpoints, ``run.json`` with the MLflow run id while it trains, ``done.json`` when it finished), ``evals/``
(sampling and probe results, keyed by what they measured) and the report. MLflow: one parent run per study, one
child per training run (the run's own losses, FD curve and checkpoints are logged there by the usual logger).
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from igdit.checkpoints import load_module
from igdit.config import ConfigError, NothingToTrain, TrainingStopped, plain_values
from igdit.data import LatentDataModule
from igdit.experiment import run_lightning_cli
from igdit.generation import Sampling
from igdit.guidance import build_rules
from igdit.metrics.evaluate import FrechetEvaluator, evaluate_settings
from igdit.study.claims import CLAIMS, Results
from igdit.study.measurements import ImportedRuns, write_measurements
from igdit.study.report import write_report
from igdit.study.spec import StudySpec, resolve_references
from igdit.tracking import open_experiment, provenance, provenance_tags


class Study:
    """A study being run: its spec, its MLflow parent run, and the records of the runs it finished."""

    def __init__(self, spec: StudySpec, out=sys.stdout, imported: Optional[ImportedRuns] = None):
        self.spec, self.out = spec, out
        self.imported = imported or ImportedRuns()  # runs measured by another invocation (--measurements)
        self.folder = spec.results
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client, self.experiment_id = open_experiment(spec.tracking_uri, spec.mlflow_experiment)
        self.uri = self.client.tracking_uri  # the default store when the spec names none
        self.parent_id = self._parent_run()
        self.records: dict[tuple[str, int], dict] = {}
        self._plan: Optional[dict] = None
        self._progress = EvaluationProgress([], False)
        self._evaluator: Optional[FrechetEvaluator] = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def _parent_run(self) -> str:
        """One parent run per study and mode, reused when the study continues."""
        mode = "quick" if self.spec.quick else "full"
        tags = f"tags.`igdit.study` = '{self.spec.name}' and tags.`igdit.mode` = '{mode}' and tags.`igdit.role` = 'study'"
        found = self.client.search_runs([self.experiment_id], filter_string=tags, max_results=1)
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{self.spec.name}-{mode}", tags={
            **provenance_tags(), "igdit.study": self.spec.name, "igdit.mode": mode, "igdit.role": "study"})
        self.client.log_artifact(run.info.run_id, self.spec.path)
        return run.info.run_id

    # ---- training -----------------------------------------------------------------------------------------
    def run_folder(self, arm: str, seed: int) -> Path:
        return self.folder / "runs" / f"{arm}-seed{seed}"

    def finished(self, arm: str, seed: int) -> bool:
        """Trained here (done.json), or measured by another invocation and read from its measurements.csv."""
        return (self.run_folder(arm, seed) / "done.json").is_file() or (arm, seed) in self.imported.records

    def train_all(self) -> None:
        """Seed by seed, so that a study stopped early already covers every arm (arms in dependency order). Says
        which run of how many starts, and when the rest should end (from the time per step of the runs trained
        so far in this session)."""
        plan = [(arm, seed) for seed in self.spec.seeds for arm in self.spec.arms]
        spent, trained_steps = 0.0, 0
        for i, (arm, seed) in enumerate(plan, start=1):
            if self.finished(arm, seed):
                self.records[(arm, seed)] = self.train(arm, seed)
                continue
            left = sum(self.spec.arm_steps(a) for a, s in plan[i - 1:] if not self.finished(a, s))
            eta = f", ETA {_duration(spent / trained_steps * left)}" if trained_steps else ""
            self.say(f"run {i}/{len(plan)}: arm {arm}, seed {seed}{eta}")
            start = time.perf_counter()
            self.records[(arm, seed)] = self.train(arm, seed)
            spent += time.perf_counter() - start
            trained_steps += self.spec.arm_steps(arm)

    # ---- training in several processes ---------------------------------------------------------------------
    def train_in_parallel(self, workers: int, argv: list[str]) -> None:
        """Train the study's runs in ``workers`` processes at once (``igdit reproduce ... --worker``), each with
        its share of the CPU threads, then read every run back. On a small CPU, processes of one thread each train
        more runs per hour than one process with all threads (2 cores: 1.5x, BENCHMARKS.md). The feature network
        and the reference statistics every run's evaluation reads are computed once here, before the workers
        start, so that they never race to write them."""
        import os
        import subprocess

        self.evaluator()
        threads = max(1, (os.cpu_count() or 1) // workers)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.say(f"training in {workers} processes of {threads} thread(s) each")
        procs = [subprocess.Popen([sys.executable, "-m", "igdit.cli", "reproduce", *argv, "--worker", str(k)], env=env)
                 for k in range(workers)]
        failed = [k for k, proc in enumerate(procs) if proc.wait() != 0]
        if failed:
            raise TrainingStopped(f"training worker(s) {failed} of the study stopped with an error (printed above); "
                                  "run the same command again to continue where they stopped")
        self.train_all()  # every run is done: read back

    def train_claimed(self, worker: int) -> None:
        """A worker's loop: train the first run in the study's order that is not done, whose checkpoint
        dependencies are done, and that no live process has claimed (an exclusive ``claim`` file in its folder
        names the process; a claim whose process is gone is taken over); wait while the rest are claimed."""
        plan = [(arm, seed) for seed in self.spec.seeds for arm in self.spec.arms]
        done = self.finished
        while True:
            pending = [(arm, seed) for arm, seed in plan if not done(arm, seed)]
            if not pending:
                return
            ready = next(((arm, seed) for arm, seed in pending
                          if all(done(need, seed) for need in self.spec.arms[arm].needs()) and self._claim(arm, seed)),
                         None)
            if ready is None:
                time.sleep(5)
                continue
            arm, seed = ready
            self.say(f"[worker {worker}] run {plan.index(ready) + 1}/{len(plan)}: arm {arm}, seed {seed} "
                     f"({len(pending) - 1} others not done yet)")
            try:
                for need in self.spec.arms[arm].needs():
                    self.records[(need, seed)] = self.train(need, seed)  # done: read back
                self.train(arm, seed)
            finally:
                (self.run_folder(arm, seed) / "claim").unlink(missing_ok=True)

    def _claim(self, arm: str, seed: int) -> bool:
        """Take the run for this process, or False when a live process holds it."""
        import os

        folder = self.run_folder(arm, seed)
        folder.mkdir(parents=True, exist_ok=True)
        claim = folder / "claim"
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    holder = int(claim.read_text() or 0)
                except (OSError, ValueError):
                    holder = 0
                if holder and _alive(holder):
                    return False
                claim.unlink(missing_ok=True)  # its process is gone (killed): take the run over
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(str(os.getpid()))
            return True
        return False

    def train(self, arm: str, seed: int) -> dict:
        """One arm with one seed; a finished run is read back, an interrupted one resumes from its last checkpoint."""
        folder = self.run_folder(arm, seed)
        done = folder / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        if (arm, seed) in self.imported.records:
            return self.imported.records[(arm, seed)]
        folder.mkdir(parents=True, exist_ok=True)
        started = folder / "run.json"
        if started.is_file():
            run_id = json.loads(started.read_text())["run_id"]
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"{arm}-seed{seed}", tags={
                **provenance_tags(), "mlflow.parentRunId": self.parent_id, "igdit.study": self.spec.name, "igdit.role": "training",
                "igdit.arm": arm, "igdit.seed": str(seed)}).info.run_id
            started.write_text(json.dumps({"run_id": run_id}))
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(self.experiment(arm, seed, run_id)))
        resume = list(folder.rglob("last.ckpt"))
        self.say(f"training {arm} seed {seed} ({self.spec.arm_steps(arm)} steps){' — resuming' if resume else ''}")
        start = time.perf_counter()
        try:
            run_lightning_cli(["fit", "--config", str(config), *(["--ckpt_path", "last"] if resume else [])])
        except NothingToTrain:  # killed after its last step, before done.json: read it back
            pass
        checkpoints = {int(torch.load(p, map_location="cpu", weights_only=True)["global_step"]): str(p)
                       for p in sorted(folder.rglob("step=*.ckpt"))}
        record = {"arm": arm, "seed": seed, "run_id": run_id, "last": str(next(folder.rglob("last.ckpt"))),
                  "checkpoints": {str(k): v for k, v in sorted(checkpoints.items())},
                  "fd": self.fd_history(run_id), "seconds": round(time.perf_counter() - start, 1),
                  "commit": provenance()["commit"]}
        done.write_text(json.dumps(record, indent=1))
        return record

    def fd_history(self, run_id: str) -> dict[str, dict[str, float]]:
        """{setting: {step: fd_digits}} as the run's FIDCallback logged it (MLflow steps are global_step - 1)."""
        run = self.client.get_run(run_id)
        out = {}
        for key in run.data.metrics:
            if key.startswith("fd_digits/"):
                history = self.client.get_metric_history(run_id, key)
                out[key.split("/", 1)[1]] = {str(m.step + 1): m.value for m in history}
        return out

    def experiment(self, arm: str, seed: int, run_id: str) -> dict:
        """The base experiment with the arm's changes and the study's protocol: seed (init, data order, sampling
        noise), budget, evaluation every ``evaluate_every`` steps, every checkpoint kept, the child MLflow run."""
        spec = self.spec
        cfg = yaml.safe_load(Path(spec.base).read_text())
        for path, value in spec.arms[arm].set.items():
            value = resolve_references(copy.deepcopy(value), lambda name: self._checkpoint_to_read(arm, name, seed))
            _set(cfg, path, value)
        cfg["seed_everything"] = seed
        cfg["data"]["seed"] = seed
        trainer = cfg["trainer"]
        trainer.update(max_steps=spec.arm_steps(arm), val_check_interval=spec.evaluate_every,
                       check_val_every_n_epoch=None, default_root_dir=str(self.run_folder(arm, seed)),
                       enable_progress_bar=False, num_sanity_val_steps=0)
        trainer["logger"] = {"class_path": "igdit.tracking.MLflowLogger", "init_args": {
            "experiment_name": spec.mlflow_experiment, "tracking_uri": self.uri, "run_id": run_id}}
        exits = bool(_get(cfg, "model.backbone.init_args.exits"))
        e = spec.evaluation
        callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith(("Checkpoint", "SampleGrid",
                                                                                        "FIDCallback"))]
        callbacks += [
            {"class_path": "igdit.callbacks.FIDCallback", "init_args": {
                "every_n_steps": spec.evaluate_every, "num_samples": e.num_samples, "sampler": e.sampler,
                "steps": e.steps, "feature": "digits", "reference": "train", "seed": seed, "grid_size": 0,
                "settings": {"none": {}, **({"ig": {"ig": {"scale": e.ig_scale}}} if exits else {})}}},
            {"class_path": "igdit.callbacks.Checkpoint", "init_args": {
                "every_n_train_steps": spec.evaluate_every, "save_top_k": -1, "save_last": True,
                "filename": "{step}"}},
            # no progress bar (runs train side by side into one log): a line every tenth of the run, with an ETA
            {"class_path": "igdit.callbacks.StepProgress", "init_args": {"label": f"{arm} seed {seed}"}}]
        trainer["callbacks"] = callbacks
        return plain_values(cfg)  # the study file's restricted numbers included

    def _checkpoint_to_read(self, arm: str, needed: str, seed: int) -> str:
        last = self.records[(needed, seed)]["last"]
        if self.imported.owns(last):
            raise ConfigError("--measurements", self.records[(needed, seed)]["imported"],
                              f"gives {needed} seed {seed} as measurements only, but {arm} trains here and reads its "
                              "checkpoint; import both or neither")
        return last

    # ---- evaluations on checkpoints -------------------------------------------------------------------------
    def evaluator(self) -> FrechetEvaluator:
        """One feature network and one reference (the train split) for every evaluation of the study."""
        if self._evaluator is None:
            root = yaml.safe_load(Path(self.spec.base).read_text())["data"]["root"]
            datamodule = LatentDataModule(root=root)
            self._evaluator = FrechetEvaluator("digits", datamodule)
            self._evaluator.reference_from_data(datamodule, "train")
        return self._evaluator

    def _cached(self, kind: str, key: dict, compute) -> Any:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        path = self.folder / "evals" / f"{kind}-{digest}.json"
        if path.is_file():
            return json.loads(path.read_text())["value"]
        if self._plan is not None:  # planning: note it, answer with a stand-in value
            self._plan.setdefault(digest, (kind, key))
            return _stand_in(kind, key, digest)
        start = time.perf_counter()
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "value": value}))
        self._progress.done(kind, key, time.perf_counter() - start, self.say)
        return value

    def plan_evaluations(self, claims) -> "EvaluationProgress":
        """The evaluations the ``claims`` will compute (those not cached yet), found by running the claims once on
        stand-in values (no network runs), so that the evaluation phase can count them and give an ETA."""
        self._plan, complete = {}, True
        try:
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")  # statistics of stand-in numbers
                for make in claims:
                    try:
                        make(Results(self))
                    except Exception:  # a claim that stand-ins cannot satisfy: counted as far as it got
                        complete = False
            planned = list(self._plan.values())
        finally:
            self._plan = None
        self._progress = EvaluationProgress(planned, complete)
        return self._progress

    def fd(self, checkpoint: str, settings: dict[str, dict], seed: int) -> dict[str, dict]:
        """{setting: {"fd", "nfe", "cost"}} of a checkpoint (its EMA weights) under named guidance settings, with the
        study's protocol; cost: network rows per sample and NFE, relative to the unguided model."""
        if self.imported.owns(checkpoint):
            return self.imported.sampled(checkpoint, settings)
        if ImportedRuns.PREFIX in json.dumps(settings):  # a guide known only by its measurements
            raise ConfigError("--measurements", json.dumps(settings), "guides with a run given as measurements "
                                                                      "only, which has no checkpoint to sample with")
        e = self.spec.evaluation
        key = {"checkpoint": checkpoint, "settings": settings, "n": e.num_samples, "sampler": e.sampler,
               "steps": e.steps, "seed": seed}

        def compute():
            module = load_module(checkpoint)
            rules = {name: build_rules(spec, f"study.{name}") for name, spec in settings.items()}
            results, _ = evaluate_settings(module, rules, self.evaluator(), e.num_samples,
                                           Sampling(e.sampler, e.steps), seed=seed, grid_size=0)
            return {name: {k: r[k] for k in ("fd", "nfe", "cost")} for name, r in results.items()}

        return self._cached("fd", key, compute)

    def probe(self, checkpoint: str, seed: int) -> float:
        """Val accuracy of a logistic regression on block features (the Probe protocol)."""
        p = self.spec.probe
        if self.imported.owns(checkpoint):
            return self.imported.probe(checkpoint, p.setting())
        key = {"checkpoint": checkpoint, "block": p.block, "t": p.t, "n": p.train_samples, "seed": seed}
        return self._cached("probe", key, lambda: probe_accuracy(load_module(checkpoint), self.data_root(),
                                                                 p.block, p.t, p.train_samples, seed))

    def data_root(self) -> str:
        return yaml.safe_load(Path(self.spec.base).read_text())["data"]["root"]


def _stand_in(kind: str, key: dict, digest: str) -> Any:
    """A made-up result of the right shape while the evaluations are planned (spread, so that tests run)."""
    rng = np.random.default_rng(int(digest, 16) % 2**32)
    if kind == "fd":
        return {name: {"fd": float(rng.uniform(1, 2)), "nfe": 1, "cost": 1.0} for name in key["settings"]}
    return float(rng.uniform(0.2, 0.8))


class EvaluationProgress:
    """Counts the evaluation phase's computed evaluations against the plan and says, for each, what it was, how long
    it took and when the rest should end (from the seconds per sampled setting and per probe so far)."""

    def __init__(self, planned: list[tuple[str, dict]], complete: bool):
        self.left = {"fd": sum(len(key["settings"]) for kind, key in planned if kind == "fd"),
                     "probe": sum(kind == "probe" for kind, _ in planned)}
        self.total, self.complete, self.count = len(planned), complete, 0
        self.seconds = {"fd": 0.0, "probe": 0.0}
        self.units = {"fd": 0, "probe": 0}

    def describe(self) -> str:
        if not self.total:
            return "every evaluation is cached" if self.complete else "evaluations: the claims decide as they go"
        return (f"{self.total} evaluation(s) to compute{'' if self.complete else ' (at least)'}: "
                f"{self.left['fd']} sampled setting(s), {self.left['probe']} probe(s); the rest are cached")

    def done(self, kind: str, key: dict, seconds: float, say) -> None:
        units = len(key["settings"]) if kind == "fd" else 1
        self.count += 1
        self.seconds[kind] += seconds
        self.units[kind] += units
        self.left[kind] = max(0, self.left[kind] - units)
        rates = {k: self.seconds[k] / self.units[k] for k in self.units if self.units[k]}
        known = all(k in rates for k in self.left if self.left[k])
        eta = sum(self.left[k] * rates.get(k, 0.0) for k in self.left)
        checkpoint = Path(key["checkpoint"])
        run = next((part for part in reversed(checkpoint.parts) if "-seed" in part), checkpoint.parent.name)
        what = (f"sampling {', '.join(key['settings'])} on {run}" if kind == "fd"
                else f"probe on {run} {checkpoint.stem}")
        total = f"/{self.total}" if self.total and self.complete else ""
        say(f"  evaluation {self.count}{total}: {what}, {seconds:.0f} s"
            + (f"; ETA {_duration(eta)}" if known and eta > 0 else ""))


@torch.no_grad()
def block_features(module, latents: torch.Tensor, labels: torch.Tensor, block: int, t: float,
                   seed: int) -> np.ndarray:
    """Mean-pooled tokens (N, D) of ``block`` on the latents noised to time t (t = 1 noise), given the null label
    (the class is what the probe must find in the features)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    times = torch.full((latents.shape[0],), float(t))
    x_t, _ = module.transport.interpolate(latents, noise, times)
    null = torch.full_like(labels, module.num_classes)  # the null label: features must not be handed the class
    features = [module.backbone(x, tt, y, hidden=[block], stop_after=block).hidden[block].mean(1)
                for x, tt, y in zip(x_t.split(256), times.split(256), null.split(256))]
    return torch.cat(features).numpy()


def probe_accuracy(module, data_root: str, block: int, t: float, train_samples: int, seed: int) -> float:
    """Linear probe: logistic regression fit on train-split features, accuracy on the val split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    datamodule = LatentDataModule(root=data_root)
    splits = {}
    for split in ("train", "val"):
        xs, ys = zip(*datamodule.latent_batches(split, 512))
        splits[split] = torch.cat(xs), torch.cat(ys)
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]
    x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    module = module.eval()
    train = block_features(module, x_train, y_train, block, t, seed)
    val = block_features(module, x_val, y_val, block, t, seed + 1)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    classifier.fit(train, y_train.numpy())
    return float(classifier.score(val, y_val.numpy()))


def _set(cfg: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        cfg = cfg.setdefault(key, {})
    cfg[keys[-1]] = value


def _get(cfg: dict, path: str) -> Any:
    for key in path.split("."):
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{int(round(seconds))}s"
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m"


def run_study(spec: StudySpec, out=sys.stdout, workers: int = 1, argv: Optional[list[str]] = None,
              train_only: bool = False, imported: Optional[ImportedRuns] = None) -> Optional[Path]:
    """Train what is not trained yet (in ``workers`` processes started with ``argv``, the command's own
    arguments), evaluate, write REPRODUCTION.md, its plots and measurements.csv; returns the report's path
    (None with ``train_only``). ``imported``: runs another invocation measured, read instead of trained."""
    start = time.perf_counter()
    study = Study(spec, out, imported)
    study.say(f"study {spec.name} ({'quick' if spec.quick else 'full'}): {len(spec.arms)} arms x {len(spec.seeds)} "
              f"seed(s) into {study.folder}; MLflow parent run {study.parent_id} in {study.uri}")
    try:
        if workers > 1:
            study.train_in_parallel(workers, argv or [])
        else:
            study.train_all()
        if train_only:
            study.client.set_terminated(study.parent_id, status="FINISHED")
            study.say("every run is trained; the same command without --train_only writes the report")
            return None
        study.say("evaluating: " + study.plan_evaluations(CLAIMS).describe())
        results = Results(study)
        claims = []
        for i, make in enumerate(CLAIMS, start=1):
            study.say(f"evaluating claim {i}/{len(CLAIMS)} ({make.__name__.removeprefix('claim_').replace('_', ' ')})")
            claims.append(make(results))
        write_measurements(study, results.measurements)
        report = write_report(study, claims, time.perf_counter() - start, provenance())
    except BaseException:
        study.client.set_terminated(study.parent_id, status="KILLED")
        raise
    study.client.set_terminated(study.parent_id, status="FINISHED")
    study.say(f"wrote {report}")
    for claim in claims:
        study.say(f"  claim {claim.key} {claim.title}: {claim.verdict}")
    return report
