"""Configuration as a Hydra user expects it: a study file anywhere composes with the shipped
groups and with groups beside it; --cfg job; +key, ~key; sweeps need -m; a bad flag shows the
subcommand's usage."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ppsearch import query
from ppsearch.errors import PPSearchError
from ppsearch.config import ConfigError, load_study
from test_query import run_cli

STUDIES = Path(__file__).resolve().parent.parent / "studies"




@pytest.fixture
def user_study(tmp_path):
    """A copy of toy.yaml in a folder of the user's, beside a trainers/ folder of their own."""
    folder = tmp_path / "mine"
    (folder / "trainers").mkdir(parents=True)
    shutil.copy(STUDIES / "toy.yaml", folder / "study.yaml")
    (folder / "trainers" / "quick.yaml").write_text("# @package _global_\nbase: embedded\nsteps: 7\n")
    return folder / "study.yaml"


def test_a_study_file_anywhere_composes_with_shipped_and_own_groups(user_study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project folder
    config = load_study(str(user_study))
    assert config.trainer.steps == load_study("toy").trainer.steps and config.search_space.boundary_step == 0.05
    assert load_study(str(user_study), ["trainer=quick"]).trainer.steps == 7
    assert load_study(str(STUDIES / "toy.yaml")).name == "toy"  # the shipped file by path, too
    with pytest.raises(PPSearchError, match="no database file"):
        query.front(str(user_study))  # read as a study, not as a URL


def test_cfg_job_prints_the_composed_config_and_runs_nothing(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "launch", "--cfg", "job", "trainer.steps=5", "storage=postgresql://u:pw@h/db")
    assert code in (0, None) and "steps: 5" in out and "postgresql://u:***@h/db" in out and "pw@" not in out
    code, out, _ = run_cli(capsys, "train", "--cfg", "job", "trainer=toy", "lr=0.5")
    assert "lr: 0.5" in out


def test_add_and_delete_overrides():
    assert load_study("toy", ["+lease_timeout=30"]).lease_timeout == 30
    assert load_study("toy", ["++trainer.lr=0.5"]).trainer.lr == 0.5
    assert load_study("toy", ["~trainer.lr"]).trainer.lr == 1e-4  # the schema's default, not toy.yaml's
    with pytest.raises(ConfigError, match="~nope: no such key"):
        load_study("toy", ["~nope"])


def test_a_comma_list_without_m_says_to_use_m_but_a_schedule_keeps_its_commas():
    with pytest.raises(ConfigError, match=r"trainer.steps=100,200 is a sweep over several values: add -m"):
        load_study("toy", ["trainer.steps=100,200"])
    assert load_study("toy", ["trainer.schedule=4x4@0.5,2x2"]).trainer.schedule == "4x4@0.5,2x2"


def test_a_bad_flag_prints_the_subcommands_usage():
    done = subprocess.run([sys.executable, "-m", "ppsearch.cli", "front", "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: ppsearch front")
    assert "unrecognized arguments: --bogus" in done.stderr


def test_top_level_help_lists_the_shipped_configurations():
    done = subprocess.run([sys.executable, "-m", "ppsearch.cli", "--help"], capture_output=True, text=True)
    assert "studies (study=NAME): imagenet256_xl, toy" in done.stdout and "--cfg job" in done.stdout


@pytest.mark.slow
def test_multirun_launches_one_study_per_value_named_after_it(tmp_path):
    bench = str(Path(__file__).resolve().parent.parent / "bench")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "ppsearch.cli", "launch", "-m", f"storage={storage}", "n_trials=2",
         "trial_function=standin:standin_trial", "warm_start.steps=0", "trainer.steps=1,2", f"checkpoint_dir={tmp_path / 'ck'}",
         f"export_dir={tmp_path / 'ex'}"], capture_output=True, text=True, timeout=600, env={"PYTHONPATH": bench,
                                                                                               "PATH": "/usr/bin:/bin",
                                                                                               "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr[-2000:]
    import optuna

    names = sorted(optuna.get_all_study_names(storage))
    assert names == ["toy-trainer.steps=1", "toy-trainer.steps=2"]
