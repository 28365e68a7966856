"""The `igdit` command: shipped configs parse, bad values stop with one line, a short fit end to end."""
import hashlib
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import short_config
from igdit.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_parse(config, capsys):
    source = yaml.safe_load(config.read_text())
    if "stages" in source:  # a chain of experiments (igdit fit runs them in order) prints every stage's config
        assert main(["fit", "--config", str(config), "--print_config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert [Path(s["config"]) for s in printed["stages"]] == [config.parent / s["config"] for s in source["stages"]]
        for stage in printed["stages"]:
            _prints_the_experiment(stage["experiment"], yaml.safe_load(Path(stage["config"]).read_text()))
        return
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    _prints_the_experiment(yaml.safe_load(capsys.readouterr().out), source)


def _prints_the_experiment(printed: dict, source: dict) -> None:
    for key in ("size", "exits", "input_size"):
        assert printed["model"]["backbone"]["init_args"][key] == source["model"]["backbone"]["init_args"][key]
    assert set(printed["model"]["terms"]) == set(source["model"]["terms"])
    assert printed["model"]["optimizer"]["class_path"] == source["model"]["optimizer"]["class_path"]
    assert printed["data"]["batch_size"] == source["data"]["batch_size"]


def test_paper_configs_carry_the_paper_settings():
    b2 = yaml.safe_load((REPO / "experiments/sit_b2_ig.yaml").read_text())
    xl = yaml.safe_load((REPO / "experiments/sit_xl2_ig.yaml").read_text())
    for cfg, exit_ in ((b2, 4), (xl, 8)):
        assert cfg["model"]["backbone"]["init_args"]["exits"] == [exit_]
        exit_loss = cfg["model"]["terms"]["ig_exit"]["init_args"]
        assert exit_loss["weight"] == 0.5 and exit_loss["loss"] == "mse"
        optimizer = cfg["model"]["optimizer"]["init_args"]
        assert optimizer["lr"] == 1e-4 and optimizer["weight_decay"] == 0
        assert cfg["data"]["batch_size"] == 256 and cfg["trainer"]["gradient_clip_val"] == 1.0
        ema = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))
        assert ema["init_args"]["decay"] == 0.9999


LONG_RUNS = [c for c in CONFIGS if yaml.safe_load(c.read_text()).get("trainer", {}).get("max_steps", 0) >= 100_000]


@pytest.mark.parametrize("config", LONG_RUNS, ids=[c.stem for c in LONG_RUNS])
def test_long_runs_keep_a_recent_resume_point_and_a_divergence_guard(config):
    cfg = yaml.safe_load(config.read_text())
    callbacks = cfg["trainer"]["callbacks"]
    resume_points = [c["init_args"] for c in callbacks if c["class_path"] == "igdit.callbacks.Checkpoint"
                     and c["init_args"].get("save_last")]
    assert resume_points and all(c["every_n_train_steps"] <= 10_000 for c in resume_points)
    assert any(c["class_path"] == "igdit.callbacks.DivergenceGuard" for c in callbacks)


def _fit_args(root: Path, scratch: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "experiments/default.yaml"), "--data.root", str(root),
            "--trainer.logger.init_args.tracking_uri", f"sqlite:///{scratch / 'mlflow.db'}",
            "--trainer.logger.init_args.artifact_location", (scratch / "mlartifacts").as_uri(),
            "--trainer.default_root_dir", str(scratch / "runs"), *extra]


@pytest.mark.parametrize("override,field", [
    (["--model.backbone.exits", "[0]"], "model.backbone.exits"),
    (["--model.backbone.exits", "[6]"], "model.backbone.exits"),
    (["--model.terms.ig_exit.weight", "-0.5"], "model.terms[ExitLoss].weight"),
    (["--model.terms.ig_exit.weight", "abc"], "model.terms[ExitLoss].weight"),
    (["--model.backbone.size", "Q/2"], "model.backbone[SiT].size"),
    (["--model.backbone.input_size", "16"], "model.input_size"),
    (["--model.backbone.num_classes", "7"], "model.num_classes"),
    (["--data.batch_size", "0"], "data.batch_size"),
    (["--trainer.precision", "17"], "trainer.precision"),
])
def test_bad_values_stop_before_compute_with_one_line(override, field, digits_root, tmp_path, capsys):
    assert main(_fit_args(digits_root, tmp_path, *override)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and field in err
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_data_path_without_shards_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_fit_args(empty, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: data.root") and "igdit data build" in err


def _short_config(tmp_path: Path) -> Path:
    """The default experiment, shortened for a test: fewer steps, EMA from the start, a smaller grid."""
    return short_config(tmp_path / "short.yaml", max_steps=40, every=20, samples_per_class=2, grid_steps=8,
                        log_every_n_steps=5)


@pytest.mark.slow
def test_fit_end_to_end_writes_mlflow_run_grid_and_reloadable_ema_checkpoint(digits_root, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from igdit.checkpoints import load_module

    args = _fit_args(digits_root, tmp_path)
    args[2] = str(_short_config(tmp_path))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "== igdit run finished ==" in out and "mlflow ui --backend-store-uri sqlite:///" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    for key in ("train/loss", "train/diffusion", "train/ig_exit", "val/loss", "val/diffusion", "val/ig_exit",
                "train/device/samples_per_sec", "lr-AdamW"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "train/diffusion")
    assert max(m.step for m in history) >= 35
    assert run.data.params["backbone/init_args/exits"] == "[2]"
    assert run.data.params["backbone/init_args/size"] == "T/2"
    assert run.data.params["root"] == str(digits_root)  # the data module's fields are logged too
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "samples.png", "images"} <= artifacts
    # provenance: the checkout's commit, the versions, the trainer settings
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head and (REPO / ".git").exists():
        assert run.data.tags["mlflow.source.git.commit"] == head
    assert run.data.tags["versions.torch"] == version("torch") and run.data.tags["versions.igdit"] == version("igdit")
    assert run.data.tags["igdit.role"] == "fit"
    assert run.data.params["trainer/max_steps"] == "40" and run.data.params["trainer/precision"] == "32-true"
    assert run.data.params["trainer/devices"] == "1" and run.data.params["trainer/world_size"] == "1"
    assert run.data.params["seed_everything"] == "0"
    assert "SampleGrid" in run.data.params["trainer/callbacks"]

    # FIDCallback: every 20 steps, each guidance setting, on the EMA weights, with grids and a best checkpoint.
    settings = ("none", "ig", "ig_cfg")
    for name in settings:
        history = client.get_metric_history(run.info.run_id, f"fd_digits/{name}")
        assert [m.step for m in history] == [19, 39] and all(0 < m.value < 1000 for m in history)
    assert run.data.params["fid/weights"] == "ema" and run.data.params["fid/metric"] == "fd_digits"
    assert run.data.params["fid/num_samples"] == "100" and run.data.params["fid/steps"] == "2"
    grids = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "images")}
    # MLflow's log_image(key, step): the UI's slider walks through each setting's grids by step
    assert {(n, s) for s in (20, 40) for n in settings} == {
        (g.split("+")[0].removeprefix("fid~"), int(g.split("+")[2])) for g in grids if g.endswith(".png")}
    assert "sample quality  fd_digits/ig" in out

    run_dir = tmp_path / "runs" / "igdit-digits" / run.info.run_id
    grid = Image.open(run_dir / "samples.png")
    # one row per class: 8x8 digits upscaled x4, 2 px apart (make_grid), under a band naming the two settings and
    # right of a band naming the classes
    header = grid.height - (10 * (8 * 4 + 2) + 2)
    assert 10 <= header <= 40 and grid.width > 2 * (2 * (8 * 4 + 2) + 2) + 8
    pixels = np.asarray(grid.convert("L"))
    band = grid.width - (2 * (2 * (8 * 4 + 2) + 2) + 8)  # left of the two blocks of two samples each
    assert pixels[:header].min() < 100 and pixels[header:, :band].min() < 100  # labels written in both bands
    assert str(run_dir / "samples.png") in out

    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain containers only
    assert checkpoint["igdit_data_meta"]["latent_shape"] == [1, 8, 8]
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    name = "backbone.final_layer.linear.weight"
    assert not torch.equal(ema[name], raw[name])  # the EMA weights are what state_dict holds
    reloaded = load_module(ckpt_path)
    torch.testing.assert_close(reloaded.state_dict()[name], ema[name])
    assert reloaded.data_meta["num_classes"] == 10
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    out = reloaded.backbone(x, torch.tensor([0.5, 0.5]), y, exits=[2])
    assert out.final.abs().sum() > 0 and out.exits[2].abs().sum() > 0  # trained, no longer zero-init

    best = list((run_dir / "checkpoints").glob("best-fd_digits-ig-step=*.ckpt"))
    assert len(best) == 1

    # Offline evaluation of the last checkpoint reproduces the value the callback logged at step 40:
    # the callback scored the EMA weights, and `igdit eval` is the same code path.
    capsys.readouterr()
    eval_args = ["eval", "--ckpt", str(ckpt_path), "--experiment", args[2], "--", *args[3:]]
    assert main(eval_args) == 0
    printed = {line.split()[0]: float(line.split()[1]) for line in capsys.readouterr().out.splitlines()
               if line.startswith("fd_digits/")}
    logged = {f"fd_digits/{n}": client.get_metric_history(run.info.run_id, f"fd_digits/{n}")[-1].value
              for n in settings}
    assert printed.keys() == logged.keys()
    for key in logged:
        assert printed[key] == pytest.approx(logged[key], rel=1e-3), key
    # the evaluation's run: named after the checkpoint, tagged with it, logged where the training run logged step 40
    evaluation = client.search_runs([run.info.experiment_id], filter_string="tags.`igdit.role` = 'evaluation'")
    assert len(evaluation) == 1
    evaluation = evaluation[0]
    assert evaluation.info.run_name == "eval-step40-last"
    tags = evaluation.data.tags
    assert tags["igdit.checkpoint.path"] == str(ckpt_path.resolve()) and tags["igdit.checkpoint.step"] == "40"
    assert tags["igdit.checkpoint.sha256"] == hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert tags["igdit.checkpoint.run_id"] == run.info.run_id and tags["versions.igdit"]
    for name in settings:
        trained = client.get_metric_history(run.info.run_id, f"fd_digits/{name}")[-1]
        scored = client.get_metric_history(evaluation.info.run_id, f"fd_digits/{name}")
        assert [m.step for m in scored] == [trained.step] == [39]
    eval_grids = [a.path for a in client.list_artifacts(evaluation.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(g.split("+")[2]) for g in eval_grids) == [40, 40, 40]

    # A second run never touches the first run's files.
    digest = hashlib.sha256(ckpt_path.read_bytes()).hexdigest()
    assert main(args) == 0
    runs = client.search_runs([client.get_experiment_by_name("igdit-digits").experiment_id])
    assert len(runs) == 3 and len({r.info.run_id for r in runs}) == 3  # fit, eval, fit
    assert hashlib.sha256(ckpt_path.read_bytes()).hexdigest() == digest


def test_igdit_help_lists_every_subcommand_and_no_empty_ones(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    for command in ("fit", "validate", "data", "sample", "eval", "sweep", "import-ckpt"):
        assert f"  {command} " in listed
    assert "  test " not in listed and "  predict " not in listed
    assert main(["test"]) == 2 and "not an igdit command" in capsys.readouterr().err


@pytest.mark.parametrize("command,argv", [
    ("data", ["build", "digits", "out", "--samples_per_shard", "50"]),
    ("sample", ["--ckpt", "m.ckpt", "--ig.scale", "1.5", "--steps", "7"]),
    ("eval", ["--npz", "s.npz", "--ref", "data/digits"]),
    ("sweep", ["sweeps/ig_guidance.yaml", "--n_trials", "3"]),
    ("import-ckpt", ["--from", "official-sit", "w.pt", "--model", "SiT-XL/2", "--exit", "8", "--out", "o.ckpt"]),
])
def test_every_subcommand_prints_its_config_and_reads_it_back(command, argv, tmp_path, capsys):
    """--print_config writes a YAML that --config reads back to the same options."""
    from igdit.commands import COMMANDS
    import importlib

    module = importlib.import_module(f"igdit.commands.{COMMANDS[command][0]}")
    parser = module._parser() if command == "data" else module.build_parser()
    with pytest.raises(SystemExit):
        main([command, *argv, "--print_config"] if command != "data" else [command, argv[0], "--print_config", *argv[1:]])
    printed = capsys.readouterr().out
    first = parser.parse_args(argv)
    saved = tmp_path / "options.yaml"
    saved.write_text(printed)
    again = parser.parse_args([argv[0], "--config", str(saved)]) if command == "data" else \
        parser.parse_args(["--config", str(saved)])
    strip = lambda ns: {k: v for k, v in ns.as_dict().items() if k not in ("config", "__path__")}  # noqa: E731
    if command == "data":
        first, again = first.build, again.build
    assert strip(again) == strip(first)
