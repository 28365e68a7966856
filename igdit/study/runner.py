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
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from igdit.checkpoints import load_module
from igdit.data import LatentDataModule
from igdit.experiment import run_lightning_cli
from igdit.generation import Sampling
from igdit.guidance import build_rules
from igdit.metrics.evaluate import FrechetEvaluator, evaluate_settings
from igdit.study.claims import CLAIMS, Results
from igdit.study.report import write_report
from igdit.study.spec import StudySpec, resolve_references
from igdit.tracking import open_experiment


class Study:
    """A study being run: its spec, its MLflow parent run, and the records of the runs it finished."""

    def __init__(self, spec: StudySpec, out=sys.stdout):
        self.spec, self.out = spec, out
        self.folder = spec.results
        self.folder.mkdir(parents=True, exist_ok=True)
        self.client, self.experiment_id = open_experiment(spec.tracking_uri, spec.mlflow_experiment)
        self.uri = self.client.tracking_uri  # the default store when the spec names none
        self.parent_id = self._parent_run()
        self.records: dict[tuple[str, int], dict] = {}
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
            "igdit.study": self.spec.name, "igdit.mode": mode, "igdit.role": "study"})
        self.client.log_artifact(run.info.run_id, self.spec.path)
        return run.info.run_id

    # ---- training -----------------------------------------------------------------------------------------
    def run_folder(self, arm: str, seed: int) -> Path:
        return self.folder / "runs" / f"{arm}-seed{seed}"

    def train_all(self) -> None:
        """Seed by seed, so that a study stopped early already covers every arm (arms in dependency order)."""
        for seed in self.spec.seeds:
            for arm in self.spec.arms:
                self.records[(arm, seed)] = self.train(arm, seed)

    def train(self, arm: str, seed: int) -> dict:
        """One arm with one seed; a finished run is read back, an interrupted one resumes from its last checkpoint."""
        folder = self.run_folder(arm, seed)
        done = folder / "done.json"
        if done.is_file():
            return json.loads(done.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        started = folder / "run.json"
        if started.is_file():
            run_id = json.loads(started.read_text())["run_id"]
        else:
            run_id = self.client.create_run(self.experiment_id, run_name=f"{arm}-seed{seed}", tags={
                "mlflow.parentRunId": self.parent_id, "igdit.study": self.spec.name, "igdit.role": "training",
                "igdit.arm": arm, "igdit.seed": str(seed)}).info.run_id
            started.write_text(json.dumps({"run_id": run_id}))
        config = folder / "config.yaml"
        config.write_text(yaml.safe_dump(self.experiment(arm, seed, run_id)))
        resume = list(folder.rglob("last.ckpt"))
        self.say(f"training {arm} seed {seed} ({self.spec.arm_steps(arm)} steps){' — resuming' if resume else ''}")
        start = time.perf_counter()
        run_lightning_cli(["fit", "--config", str(config), *(["--ckpt_path", "last"] if resume else [])])
        checkpoints = {int(torch.load(p, map_location="cpu", weights_only=True)["global_step"]): str(p)
                       for p in sorted(folder.rglob("step=*.ckpt"))}
        record = {"arm": arm, "seed": seed, "run_id": run_id, "last": str(next(folder.rglob("last.ckpt"))),
                  "checkpoints": {str(k): v for k, v in sorted(checkpoints.items())},
                  "fd": self.fd_history(run_id), "seconds": round(time.perf_counter() - start, 1)}
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
            _set(cfg, path, resolve_references(copy.deepcopy(value), lambda name: self.records[(name, seed)]["last"]))
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
                "filename": "{step}"}}]
        trainer["callbacks"] = callbacks
        return json.loads(json.dumps(cfg))  # plain values only (the study file's restricted numbers included)

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
        value = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "value": value}))
        return value

    def fd(self, checkpoint: str, settings: dict[str, dict], seed: int) -> dict[str, dict]:
        """{setting: {"fd", "nfe", "cost"}} of a checkpoint (its EMA weights) under named guidance settings, with the
        study's protocol; cost: network rows per sample and NFE, relative to the unguided model."""
        e = self.spec.evaluation
        key = {"checkpoint": checkpoint, "settings": settings, "n": e.num_samples, "sampler": e.sampler,
               "steps": e.steps, "seed": seed}

        def compute():
            module = load_module(checkpoint)
            rules = {name: build_rules(spec, f"study.{name}") for name, spec in settings.items()}
            out = {}
            results, _ = evaluate_settings(module, rules, self.evaluator(), e.num_samples,
                                           Sampling(e.sampler, e.steps), seed=seed, grid_size=0)
            return {name: {k: r[k] for k in ("fd", "nfe", "cost")} for name, r in results.items()}

        return self._cached("fd", key, compute)

    def probe(self, checkpoint: str, seed: int) -> float:
        """Val accuracy of a logistic regression on block features (the Probe protocol)."""
        p = self.spec.probe
        key = {"checkpoint": checkpoint, "block": p.block, "t": p.t, "n": p.train_samples, "seed": seed}
        return self._cached("probe", key, lambda: probe_accuracy(load_module(checkpoint), self.data_root(),
                                                                 p.block, p.t, p.train_samples, seed))

    def data_root(self) -> str:
        return yaml.safe_load(Path(self.spec.base).read_text())["data"]["root"]


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


def run_study(spec: StudySpec, out=sys.stdout) -> Path:
    """Train what is not trained yet, evaluate, write REPRODUCTION.md and its plots; returns the report's path."""
    start = time.perf_counter()
    study = Study(spec, out)
    study.say(f"study {spec.name} ({'quick' if spec.quick else 'full'}): {len(spec.arms)} arms x {len(spec.seeds)} "
              f"seed(s) into {study.folder}; MLflow parent run {study.parent_id} in {study.uri}")
    try:
        study.train_all()
        results = Results(study)
        claims = [make(results) for make in CLAIMS]
        report = write_report(study, claims, time.perf_counter() - start)
    except BaseException:
        study.client.set_terminated(study.parent_id, status="KILLED")
        raise
    study.client.set_terminated(study.parent_id, status="FINISHED")
    study.say(f"wrote {report}")
    for claim in claims:
        study.say(f"  claim {claim.key} {claim.title}: {claim.verdict}")
    return report
