"""What users ask of a study (DataFrames, picks, export, plot) and the status, front, plot and
export commands, on a SQLite file and on PostgreSQL: a study made in-process with Optuna and
ppsearch rows saved by the Store, as the driver leaves them."""
import dataclasses
import io
import json
import re
import subprocess
import sys

import numpy as np
import optuna
import pandas as pd
import pytest
from hypothesis import given, strategies as st

from ppsearch import query
from ppsearch.cli import main
from ppsearch.config import load_study, load_trainer
from ppsearch.store import Store, config_json
from postgres import BACKENDS, PASSWORD, new_database

NAME = "demo"
# (schedule, baseline, gmacs, fid, state). Front by GMACs: 4, 2, 1, 0; 3 is dominated by 2.
TRIALS = [
    ("2x2", "base", 1.0, 10.0, "COMPLETE"),
    ("4x4@0.5,2x2", "PPF-2", 0.62, 11.0, "COMPLETE"),
    ("4x4@0.5,2x4@0.75,2x2", "PPF-3", 0.45, 12.5, "COMPLETE"),
    ("8x8@0.3,2x2", None, 0.5, 14.0, "COMPLETE"),
    ("4x4@0.8:cfg1.5,2x2", None, 0.3, 20.0, "COMPLETE"),
    ("8x8@0.5,2x2", None, 0.35, None, "FAIL"),
    ("4x2@0.6,2x2", None, 0.55, None, "RUNNING"),
]


def make_study(url, name=NAME, with_config=True):
    """A study as the driver leaves it: TRIALS in Optuna (values, user attributes) and, unless
    ``with_config`` is False, its configuration in ppsearch's table."""
    config = load_study("toy", [f"name={name}", "n_trials=10"])
    config.storage = url
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"])
    for number, (schedule, baseline, gmacs, fid, state) in enumerate(TRIALS):
        attrs = {"schedule": schedule, "gmacs": gmacs, "relative_gmacs": gmacs, "attempts": 3 if state == "FAIL" else 1,
                 "fid_details": {"extractor": "digits", "num_samples": 1000}, "timings": {"total": 12.0}}
        if baseline:
            attrs["baseline"] = baseline
        if fid is not None:
            attrs.update(fid_std=0.3, checkpoint=f"runs/{number}", losses=[[50, 0.5], [100, 0.3]], final_loss=0.3)
        if state == "FAIL":
            attrs.update(error="CUDA out of memory\nTraceback (most recent call last): ...",
                         log_tail=["12:00:00 step 50/100 loss 0.5000", "12:00:01 failed: CUDA out of memory"])
        if state == "RUNNING":
            trial = study.ask()
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            continue
        study.add_trial(optuna.trial.create_trial(
            state=getattr(optuna.trial.TrialState, state), values=[gmacs, fid] if state == "COMPLETE" else None,
            user_attrs=attrs))
    if with_config:
        with Store(url) as store:
            study_id = storage.get_study_id_from_name(name)
            store.acquire(study_id, name, "maker", 60)
            store.set_identity(study_id, "uid-" + name, config_json(config))
            store.release(study_id, "maker")
    storage.engine.dispose()
    return config


@pytest.fixture(scope="module", params=BACKENDS)
def study(request, tmp_path_factory):
    """The demo study (read-only to the tests), beside a study that ppsearch did not launch."""
    url = new_database(request, request.param, tmp_path_factory.mktemp("study"))
    make_study(url, "bare", with_config=False)
    return make_study(url)


def test_trials_and_front_as_dataframes(study):
    trials = query.trials(study)
    assert list(trials.columns[:len(query.COLUMNS)]) == query.COLUMNS
    assert list(trials.trial) == [4, 5, 2, 3, 6, 1, 0]  # by GMACs
    assert trials.set_index("trial").loc[1, "speedup"] == pytest.approx(1 / 0.62)
    front = query.front(study)
    assert list(front.trial) == [4, 2, 1, 0] and set(front.state) == {"COMPLETE"}
    assert list(front.baseline.fillna("-")) == ["-", "PPF-3", "PPF-2", "base"]
    assert list(query.front(study, max_gmacs=0.62).trial) == [4, 2, 1]
    assert list(query.front(study, max_gmacs=0.62, max_fid=12.5).trial) == [2, 1]
    assert list(query.front(study.storage, NAME).trial) == [4, 2, 1, 0]  # by URL and name, for notebooks


def test_unknown_study_lists_the_studies_present(study):
    with pytest.raises(query.QueryError, match=r"no study 'nope' in .*; studies present: bare, demo$"):
        query.front(study.storage, "nope")


def front_of(points):
    return pd.DataFrame({"trial": range(len(points)), "gmacs": [p[0] for p in points],
                         "fid": [p[1] for p in points]})


def test_picks_on_the_front(study):
    front = query.front(study)
    assert query.pick_trial(front, "knee") == 2
    assert query.pick_trial(front, "best-fid-under-gmacs=0.5") == 2
    assert query.pick_trial(front, "best-fid-under-gmacs=0.62") == 1
    assert query.pick_trial(front, "best-fid-under-gmacs=5") == 0
    with pytest.raises(query.QueryError, match="no front trial costs at most 0.2 GMACs; the cheapest costs 0.3"):
        query.pick_trial(front, "best-fid-under-gmacs=0.2")
    for bad in ["elbow", "best-fid-under-gmacs=", "best-fid-under-gmacs=cheap", "best-fid-under=1"]:
        with pytest.raises(query.QueryError, match="bad pick"):
            query.pick_trial(front, bad)


def test_knee_of_short_and_scaled_fronts():
    assert query.pick_trial(front_of([(1.0, 5.0)]), "knee") == 0
    assert query.pick_trial(front_of([(1.0, 5.0), (2.0, 4.0)]), "knee") == 1  # no bend: the lower FID
    # The knee does not depend on the units of either objective.
    points = [(0.1, 30.0), (0.2, 12.0), (0.5, 10.0), (1.0, 9.5)]
    assert query.pick_trial(front_of(points), "knee") == 1
    assert query.pick_trial(front_of([(1000 * g, f / 100) for g, f in points]), "knee") == 1
    with pytest.raises(query.QueryError, match="the front is empty"):
        query.pick_trial(front_of([]), "knee")


@given(st.lists(st.tuples(st.floats(0.01, 10), st.floats(0.0, 300)), min_size=1, max_size=20))
def test_knee_is_on_the_front_and_farthest_from_the_chord(points):
    front = front_of([p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)])
    chosen = front.set_index("trial").loc[query.pick_trial(front, "knee")]
    x = (front.gmacs - front.gmacs.min()) / ((front.gmacs.max() - front.gmacs.min()) or 1)
    y = (front.fid - front.fid.min()) / ((front.fid.max() - front.fid.min()) or 1)
    gain = 1 - x - y
    assert np.isclose(gain[front.trial == chosen.name].iloc[0], gain.max())


def test_export_loads_as_a_trainer_config(study, tmp_path):
    path = query.export_trial(study, trial=4, out=tmp_path / "fast.yaml")
    assert path.read_text().startswith("# @package _global_\n")
    trainer = load_trainer(str(path))
    assert trainer.schedule == "4x4@0.8:cfg1.5,2x2"  # the stage's guidance travels in the schedule
    assert trainer.out_dir == "runs/demo-trial4"
    recipe = {k: v for k, v in (study.trainer.full_training or {}).items() if k != "about"}
    assert trainer.full_training is None and trainer.steps == recipe.get("steps", study.trainer.steps)
    expected = dataclasses.replace(study.trainer, schedule=trainer.schedule, out_dir=trainer.out_dir, full_training=None,
                                   eval=trainer.eval, **{k: v for k, v in recipe.items() if k != "eval"})
    assert trainer == expected  # the study's trainer with its full-training recipe, nothing else


def test_export_refuses_unknown_and_unfinished_trials(study):
    with pytest.raises(query.QueryError, match="study 'demo' has no trial 42; its trials are numbered 0 to 6"):
        query.export_trial(study, trial=42)
    with pytest.raises(query.QueryError, match="trial 5 of study 'demo' is FAIL, not COMPLETE: CUDA out of memory$"):
        query.export_trial(study, trial=5)
    with pytest.raises(query.QueryError, match="trial 6 of study 'demo' is RUNNING, not COMPLETE$"):
        query.export_trial(study, trial=6)


def test_export_needs_the_stored_configuration(study, tmp_path):
    with pytest.raises(query.QueryError, match="study 'bare' holds no ppsearch configuration"):
        query.export_trial(study.storage, "bare", trial=0, out=tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()


def test_hypervolume_history_is_exact():
    points = np.array([[2.0, 2.0], [1.0, 3.0], [3.0, 1.0], [2.5, 2.5], [5.0, 0.5]])  # the last: outside
    assert query.hypervolume_history(points, np.array([4.0, 4.0])) == pytest.approx([4.0, 5.0, 6.0, 6.0, 6.0])


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12))
def test_hypervolume_is_the_area_a_grid_of_cells_counts(points):
    """Against a brute force: the share of a fine grid's cells that some point dominates."""
    cells = (np.arange(200) + 0.5) / 200
    x, y = np.meshgrid(cells, cells)
    covered = np.zeros_like(x, dtype=bool)
    for px, py in points:
        covered |= (x >= px) & (y >= py)
    assert query.hypervolume(np.array(points), np.array([1.0, 1.0])) == pytest.approx(covered.mean(), abs=0.011)


def test_show_command_prints_one_trial(study, capsys):
    code, out, _ = run_cli(capsys, "show", "5", *study_words(study))
    assert code == 0
    assert out.splitlines()[0] == "trial 5: 8x8@0.5,2x2  [FAIL]"
    assert "  attempts  3" in out and "12:00:01 failed: CUDA out of memory" in out
    code, out, _ = run_cli(capsys, "show", "1", *study_words(study))
    assert "  FID       11.00 +- 0.30 (1000 samples, digits)" in out and "0.5000 -> 0.3000 over 100 steps" in out
    code, _, err = run_cli(capsys, "show", "99", *study_words(study))
    assert code == 2 and "has no trial 99" in err


def test_plot_writes_a_figure_fit_for_a_paper(study, tmp_path):
    from PIL import Image

    path = query.plot(study, out=tmp_path / "plots" / "front.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 600
    svg = query.plot(study, out=tmp_path / "front.svg").read_text()
    for text in ["digits-classifier features", "speed-up over the base", "4x4@0.5,2x4@0.75,2x2",
                 "picked (knee)", "PPF-2 (4x4@0.5,2x2)", "results (as ppsearch status and n_trials count them)"]:
        assert text in svg, text
    assert query.plot(study, out=tmp_path / "front.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(query.QueryError, match="must end in .png, .svg, .pdf"):
        query.plot(study, out=tmp_path / "front.jpg")


def run_cli(capsys, *words):
    """(exit code, stdout, stderr) of ``ppsearch WORDS``, in this process."""
    try:
        main(list(words))
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


def study_words(config):
    # Quoted, as on a shell: Hydra's override grammar reads '=' in a plain value (a URL's query) as a syntax error.
    return [f"storage='{config.storage}'", f"name={config.name}"]


def test_status_command(study, capsys):
    code, out, err = run_cli(capsys, "status", *study_words(study))
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0].endswith(": 7 trials, 5 COMPLETE, 1 FAIL, 1 RUNNING")
    assert lines[1] == "driver: none running; the RUNNING trials were interrupted and resume on the next launch"
    assert lines[2] == ("compute: 0.02 worker-hours spent on 6 trials run (0.00333 per trial); about 0.0133 more "
                        "for the 4 results left of n_trials=10")  # 6 trials of 12 s; the RUNNING one not yet
    assert "front (4 trials):" in lines
    assert "  trial 5 8x8@0.5,2x2 (3 attempts): CUDA out of memory" in lines
    assert PASSWORD not in out and "Traceback" not in out


def test_front_command_formats(study, capsys):
    code, out, _ = run_cli(capsys, "front", "--max-gmacs", "0.7", *study_words(study))
    assert code == 0
    assert out.splitlines()[1].split() == ["schedule", "GMACs", "speed-up", "FID", "trial", "baseline"]
    assert out.splitlines()[3].split() == ["4x4@0.5,2x4@0.75,2x2", "0.45", "2.22x", "12.5", "+-", "0.3", "2", "PPF-3"]
    _, out, _ = run_cli(capsys, "front", "--format", "csv", *study_words(study))
    assert pd.read_csv(io.StringIO(out)).trial.tolist() == [4, 2, 1, 0]
    _, out, _ = run_cli(capsys, "front", "--format", "json", "--max-fid", "11", *study_words(study))
    assert [row["trial"] for row in json.loads(out)] == [1, 0]


def test_export_command_picks_the_knee(study, capsys, tmp_path):
    out_file = tmp_path / "knee.yaml"
    code, out, err = run_cli(capsys, "export", "--pick", "knee", "--out", str(out_file), *study_words(study))
    assert code == 0 and not err
    assert out.strip() == f"exported trial 2 of study demo to {out_file}; train it with: ppsearch train {out_file}"
    assert load_trainer(str(out_file)).schedule == "4x4@0.5,2x4@0.75,2x2"


@pytest.mark.parametrize("words, message", [
    (["front", "name=nope"], "no study 'nope' in .*; studies present: bare, demo"),
    (["export", "--trial", "42"], "no trial 42"),
    (["export", "--trial", "5"], "is FAIL, not COMPLETE: CUDA out of memory"),
    (["export", "--pick", "elbow"], "bad pick 'elbow'"),
    (["export", "--pick", "best-fid-under-gmacs=0.01"], "no front trial costs at most 0.01 GMACs"),
])
def test_cli_errors_are_one_line(study, capsys, words, message):
    code, out, err = run_cli(capsys, words[0], *study_words(study), *words[1:])
    assert code == 2 and not out
    assert len(err.splitlines()) == 1 and err.startswith(f"ppsearch {words[0]}: error: ")
    assert re.search(message, err) and PASSWORD not in err


@pytest.mark.parametrize("storage, message", [
    ("postgresql://ppsearch:{password}@127.0.0.1:1/ppsearch", "cannot reach database postgresql://ppsearch:\\*\\*\\*@"),
    ("nosuchdb://ppsearch:{password}@host/x", "bad database URL nosuchdb://ppsearch:\\*\\*\\*@host/x"),
    ("sqlite:///{tmp}/typo.db", "no database file .*typo.db"),
])
def test_cli_database_errors_hide_the_password(capsys, tmp_path, storage, message):
    code, out, err = run_cli(capsys, "status", f"storage={storage.format(password=PASSWORD, tmp=tmp_path)}")
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err) and PASSWORD not in err


def test_cli_on_postgres_never_shows_the_password(postgres_url, capsys):
    make_study(postgres_url, name="pg")  # a plain URL, as a user passes it
    for words, expected_code in [(["status"], 0), (["front"], 0), (["front", "name=nope"], 2),
                                 (["export", "--trial", "5"], 2)]:
        code, out, err = run_cli(capsys, words[0], f"storage={postgres_url}", "name=pg", *words[1:])
        assert code == expected_code and PASSWORD not in out + err
    assert "postgresql://ppsearch:***@127.0.0.1" in run_cli(capsys, "status", f"storage={postgres_url}", "name=pg")[1]


@pytest.mark.slow
def test_the_installed_command_exits_2_with_one_line(postgres_url):
    bad = postgres_url.rsplit(":", 1)[0] + ":1/ppsearch"
    done = subprocess.run([sys.executable, "-m", "ppsearch.cli", "front", f"storage={bad}"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.startswith("ppsearch front: error: cannot reach database") and PASSWORD not in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_picks_treat_points_within_noise_as_ties_and_take_the_cheaper():
    front = pd.DataFrame({"trial": [0, 1, 2, 3], "gmacs": [0.3, 0.5, 0.6, 1.0],
                          "fid": [40.0, 24.0, 22.0, 20.0], "fid_std": [2.0, 1.5, 1.5, 1.0]})
    # the knee by the chord alone would be trial 1 or 2; 22 +- 1.5 and 24 +- 1.5 tie
    trial, why = query.pick(front, "best-fid-under-gmacs=0.7")
    assert trial == 1 and why.startswith("trial 1: FID 24 +- 1.5 ties with trial 2")
    assert query.pick(front, "cheapest-under-fid=23")[0] == 2  # 24 > 23: not allowed, whatever the noise
    trial, why = query.pick(front, "cheapest-under-fid=30")
    assert trial == 1 and why == "trial 1: the fewest GMACs at FID no more than 30 (FID 24 at 0.5 GMACs)"
    quiet = front.assign(fid_std=0.1)  # without noise to hide behind, the lower FID stands
    assert query.pick(quiet, "best-fid-under-gmacs=0.7")[0] == 2
    with pytest.raises(query.QueryError, match="no front trial has FID at most 10; the lowest is 20"):
        query.pick(front, "cheapest-under-fid=10")
