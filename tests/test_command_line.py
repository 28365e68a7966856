"""One command-line style for every subcommand (LightningCLI's): underscores, -c/--config, presets before
--print_config, one-line refusals for a YAML of the wrong kind, --version, python -m igdit, a help page cache."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from igdit.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_help_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _printed(argv, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("command,argv", [
    ("sample", ["--ckpt", "m.ckpt", "--ig.scale", "1.5", "--steps", "7", "--batch_size", "3"]),
    ("eval", ["--npz", "s.npz", "--ref", "data/digits", "--inception_weights", "w.pth"]),
    ("sweep", ["sweeps/ig_guidance.yaml", "--n_trials", "3"]),
    ("reproduce", ["experiments/studies/reproduce.yaml", "--seeds", "[0, 1]"]),
    ("import-ckpt", ["--from", "official-sit", "w.pt", "--input_size", "16", "--out", "o.ckpt"]),
    ("data build", ["digits", "out", "--samples_per_shard", "50", "--val_fraction", "0.2"]),
    ("data verify", ["data/digits"]),
])
def test_short_c_reads_back_what_print_config_wrote_on_every_subcommand(command, argv, tmp_path, capsys):
    command = command.split()
    first = _printed([*command, *argv], capsys)
    saved = tmp_path / "options.yaml"
    saved.write_text(yaml.safe_dump(first))
    again = _printed([*command, "-c", str(saved)], capsys)  # positional arguments included
    assert again == first and first  # every option came back from the file


def test_fit_and_validate_take_c(capsys):
    printed = _printed(["fit", "-c", str(REPO / "experiments/default.yaml"), "--trainer.max_steps", "7"], capsys)
    assert printed["trainer"]["max_steps"] == 7 and printed["model"]["backbone"]["init_args"]["size"] == "T/2"
    printed = _printed(["validate", "-c", str(REPO / "experiments/default.yaml")], capsys)
    assert printed["trainer"]["max_steps"] == 1500


def test_print_config_shows_the_preset_it_will_run_and_options_still_override_it(tmp_path, capsys):
    printed = _printed(["sample", "--preset", "lightningdit-xl1-ig-cfg"], capsys)
    assert (printed["sampler"], printed["steps"], printed["schedule"]) == ("heun", 124, "shifted")
    assert printed["ig"]["scale"] == 1.4 and printed["cfg"]["scale"] == 1.45
    printed = _printed(["sample", "--preset", "lightningdit-xl1-ig-cfg", "--steps", "10"], capsys)
    assert (printed["sampler"], printed["steps"]) == ("heun", 10)
    options = tmp_path / "o.yaml"
    options.write_text("preset: sit-xl2-ig-cfg\nckpt: m.ckpt\n")
    printed = _printed(["sample", "-c", str(options)], capsys)  # a preset named in the options file counts too
    assert (printed["sampler"], printed["steps"], printed["ig"]["scale"]) == ("sde", 250, 1.4)


def test_old_hyphenated_spellings_still_work_with_one_deprecation_line(capsys):
    old = _printed(["sample", "--ckpt", "m.ckpt", "--batch-size", "3"], capsys)
    new = _printed(["sample", "--ckpt", "m.ckpt", "--batch_size", "3"], capsys)
    assert old == new and old["batch_size"] == 3
    with pytest.raises(SystemExit):
        main(["data", "build", "digits", "out", "--samples-per-shard", "50", "--samples-per-shard=60",
              "--no-progress", "--print_config"])
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["samples_per_shard"] == 60
    assert captured.err.splitlines() == ["igdit data: --samples-per-shard is deprecated; use --samples_per_shard",
                                         "igdit data: --no-progress is deprecated; use --no_progress"]


@pytest.mark.parametrize("argv,message", [
    (["sample", "--ckpt", "x.ckpt", "--config", "experiments/default.yaml"],
     "error: --config: 'experiments/default.yaml' is not allowed; this is an experiment YAML; pass it as "
     "--experiment experiments/default.yaml"),
    (["eval", "--ckpt", "x.ckpt", "-c", "experiments/default.yaml"], "pass it as --experiment experiments/default"),
    (["sweep", "--config", "sweeps/ig_guidance.yaml"],
     "error: --config: 'sweeps/ig_guidance.yaml' is not allowed; this is a sweep file; pass it as the first "
     "argument: igdit sweep sweeps/ig_guidance.yaml"),
    (["reproduce", "-c", "experiments/studies/reproduce.yaml"], "pass it as the first argument: igdit reproduce"),
    (["sweep", "experiments/default.yaml"], "error: sweep: 'experiments/default.yaml' is not allowed; this is an "
                                            "experiment YAML (igdit fit --config <file>); `igdit sweep` takes a sweep"),
    (["reproduce", "sweeps/ig_guidance.yaml"], "this is a sweep file (igdit sweep <file>); `igdit reproduce` takes a "
                                               "study file"),
    (["fit", "--config", "sweeps/ig_guidance.yaml"], "this is a sweep file (igdit sweep <file>); -c/--config of "
                                                     "`igdit fit` takes an experiment YAML"),
    (["fit", "-c", "experiments/studies/reproduce.yaml"], "this is a study file (igdit reproduce <file>)"),
    (["data", "build", "digits", "out", "-c", "sweeps/ig_guidance.yaml"], "this is a sweep file"),
])
def test_a_yaml_of_the_wrong_kind_is_refused_in_one_line_naming_the_right_place(argv, message, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the shipped files by their relative names, as a user types them; nothing is written
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_version_and_python_dash_m(capsys):
    assert main(["--version"]) == 0
    version = capsys.readouterr().out.strip()
    assert version.startswith("igdit ") and len(version) > len("igdit ")
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "igdit", "--version"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == version
    done = subprocess.run([sys.executable, "-m", "igdit", "sweep", "--help"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0 and "--n_trials" in done.stdout and "-c CONFIG, --config CONFIG" in done.stdout


def test_help_imports_nothing_heavy_for_light_commands():
    """`igdit --help` and the help of commands whose options are plain types load neither torch nor Lightning."""
    code = ("import sys; from igdit.commands import main\n"
            "for argv in (['--help'], ['sweep', '--help'], ['reproduce', '--help'], ['eval', '--help']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'mlflow', 'optuna', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "IGDIT_HELP_CACHE": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_help_pages_come_from_the_cache_after_the_first_time_and_follow_the_code(tmp_path, capsys, monkeypatch):
    from igdit.commands import helpcache

    calls = []

    def run():
        calls.append(1)
        print("usage: igdit sweep ...")
        raise SystemExit(0)

    assert helpcache.answer_help("sweep", run) == 0
    assert helpcache.answer_help("sweep", run) == 0
    assert capsys.readouterr().out == "usage: igdit sweep ...\n" * 2 and len(calls) == 1
    pages = list((tmp_path / "cache" / "igdit" / "help").glob("sweep-*.txt"))
    assert len(pages) == 1
    monkeypatch.setattr(helpcache, "help_key", lambda command: "another-version")  # a changed source file
    assert helpcache.answer_help("sweep", run) == 0 and len(calls) == 2
    assert [p.name for p in (tmp_path / "cache" / "igdit" / "help").glob("sweep-*.txt")] == ["sweep-another-version.txt"]
    monkeypatch.setenv("IGDIT_HELP_CACHE", "0")
    assert helpcache.answer_help("sweep", run) == 0 and len(calls) == 3
    # the real page, cached and not, is the same text
    capsys.readouterr()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    assert main(["sweep", "--help"]) == 0
    first = capsys.readouterr().out
    assert main(["sweep", "--help"]) == 0
    assert capsys.readouterr().out == first and "usage: igdit sweep" in first


def test_the_cli_silences_third_party_notes_that_say_nothing_to_an_igdit_user(caplog):
    import logging
    import warnings

    import optuna
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from igdit.commands import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()  # what igdit's entry point runs, after whatever filters were there
        warnings.warn("set_metric_names is experimental (supported from v3.2.0). The interface can change in the "
                      "future.", optuna.exceptions.ExperimentalWarning)
        warnings.warn("Argument ``heartbeat_interval`` is an experimental feature. The interface can change in the "
                      "future.", optuna.exceptions.ExperimentalWarning)
        warnings.warn("You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage.")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
                      FutureWarning)
        warnings.warn("a warning igdit's user should see")
    assert [str(w.message) for w in caught] == ["a warning igdit's user should see"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging ... try installing [litlogger](https://pypi.org/...)")
        rank_zero_info("a note igdit's user should see")
    assert "litlogger" not in caplog.text and "a note igdit's user should see" in caplog.text
