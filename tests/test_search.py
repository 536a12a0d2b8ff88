"""The search end to end: real Ray (a local cluster started by the command), a real SQLite
file and a real PostgreSQL server, trials that really fine-tune and score the embedded base."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from ppsearch.cli import main
from ppsearch.config import load_trainer
from ppsearch.store import Store, non_dominated

pytestmark = pytest.mark.slow

# Trials as small as still meaningful: 2 fine-tune steps, 40 samples with 3 solver steps.
FAST = ["trainer.steps=2", "trainer.batch_size=8", "trainer.eval.num_samples=40", "trainer.eval.batch_size=40",
        "trainer.eval.steps=3", "trainer.eval.fid.num_splits=2"]


def _launch_args(storage, tmp_path, *extra):
    return ["launch", f"storage={storage}", f"checkpoint_dir={tmp_path / 'ck'}", f"export_dir={tmp_path / 'ex'}",
            f"trainer.eval.fid.cache_dir={tmp_path / 'fid'}", *FAST, *extra]


def _start(args, log):
    """The ppsearch command in its own process group (so a kill takes its Ray with it)."""
    return subprocess.Popen([sys.executable, "-m", "ppsearch.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _run(args, tmp_path, timeout=600):
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)
        assert process.wait(timeout) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    return (tmp_path / "launch.log").read_text()


def _trials(storage, name="toy"):
    return Store(storage).trials(name)


def _wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_database")


def test_full_study_front_and_export_round_trip(storage, tmp_path):
    out = _run(_launch_args(storage, tmp_path, "n_trials=5"), tmp_path)
    trials = _trials(storage)
    ran = trials[trials.state != "RUNNING"]
    assert set(trials.state) == {"COMPLETE"} and len(ran) >= 5
    assert set(trials.baseline.dropna()) == {"base", "PPF-2", "PPF-3"}
    assert set(trials[trials.baseline == "PPF-3"].schedule) == {"4x4@0.5,2x4@0.75,2x2"}
    points = list(zip(trials.gmacs, trials.fid))
    assert sorted(Store(storage).front("toy").trial) == sorted(trials.trial.iloc[non_dominated(points)])
    study = optuna.load_study(study_name="toy", storage=storage)
    assert len(study.best_trials) >= 1 and all(t.user_attrs["schedule"] for t in study.trials)
    assert "front:" in out
    # Export a front trial and train from the file, as a user would.
    export = tmp_path / "picked.yaml"
    main(["export", "--pick", "knee", "--out", str(export), f"storage={storage}"])
    config = load_trainer(str(export))
    assert config.schedule in set(trials.schedule)
    main(["train", str(export), "steps=2", f"out_dir={tmp_path / 'full'}", "progress=false"])
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_resume_after_the_driver_is_killed_mid_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=4", "ray.max_concurrent=1")
    with open(tmp_path / "launch.log", "a") as log:
        process = _start([*args, "trainer.steps=60"], log)
        try:
            _wait_for(lambda: (lambda t: (t.state == "COMPLETE").sum() >= 1 and (t.state == "RUNNING").sum() >= 1)(
                _trials(storage)) if (tmp_path / "study.db").exists() and _has_table(storage) else False,
                what="one finished and one running trial")
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    before = _trials(storage)
    completed = before[before.state == "COMPLETE"].set_index("trial")
    interrupted = before[before.state == "RUNNING"]
    _run([*args, "trainer.steps=60"], tmp_path)
    after = _trials(storage).set_index("trial")
    assert "RUNNING" not in set(after.state)
    for number, row in completed.iterrows():  # nothing finished was lost or redone
        assert after.loc[number, "state"] == "COMPLETE" and after.loc[number, "fid"] == row.fid
    for row in interrupted.itertuples():
        assert after.loc[row.trial, "state"] == "FAIL" and "interrupted" in after.loc[row.trial, "error"]
        rerun = after[(after.schedule == row.schedule) & (after.state == "COMPLETE")]
        assert len(rerun) == 1  # its schedule ran again
    study = optuna.load_study(study_name="toy", storage=storage)
    assert sum(1 for t in study.trials if t.user_attrs.get("counted")) == 4  # the budget holds
    assert (after.state == "COMPLETE").sum() == 4


def _has_table(storage):
    try:
        _trials(storage)
        return True
    except Exception:
        return False


def test_a_killed_worker_retries_its_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=3", "ray.max_concurrent=1", "trainer.steps=60")
    killed = []
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)

        def kill_a_worker():
            ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
            pids = [int(line.split()[0]) for line in ps.splitlines() if "ray::run_trial" in line]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return bool(pids)

        _wait_for(kill_a_worker, what="a Ray worker running a trial")
        assert process.wait(600) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    trials = _trials(storage)
    assert killed and set(trials.state) == {"COMPLETE"} and len(trials) == 3


def test_a_trial_that_raises_fails_alone_and_the_study_goes_on(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # lr = 1e30: the first step throws the weights to ~1e30, the second step's loss is not finite.
    _run(_launch_args(storage, tmp_path, "n_trials=3", "trainer.lr=1e30", "ray.max_retries=0"), tmp_path)
    trials = _trials(storage)
    assert list(trials.state) == ["FAIL"] * 3
    assert all("NonFiniteLoss: non-finite training loss" in e for e in trials.error)
    status = subprocess.run([sys.executable, "-m", "ppsearch.cli", "status", f"storage={storage}"],
                            capture_output=True, text=True)
    assert status.returncode == 0 and "NonFiniteLoss" in status.stdout


@pytest.mark.parametrize("extra, message", [
    (["study=nope"], "unknown study 'nope'"),
    (["n_trialz=3"], "n_trialz"),
    (["trainer.steps=many"], "trainer.steps"),
    (["search_space.patch_shapes=[3x3,2x2]"], "does not divide"),
    (["ray.num_gpus_per_trial=1"], "GPUs"),
    (["sampler=bayes"], "unknown sampler"),
    (["trainer.eval.steps=2"], "fewer than the 3 stages"),
    (["storage=postgresql://ppsearch:secret@127.0.0.1:1/none"], "cannot reach database"),
    (["trainer.base=/nonexistent/base.pt"], "not found"),
])
def test_user_mistakes_are_one_line(tmp_path, extra, message):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = subprocess.run([sys.executable, "-m", "ppsearch.cli", *_launch_args(storage, tmp_path, *extra)],
                            capture_output=True, text=True, timeout=300)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and message in err[-1] and "Traceback" not in result.stderr, result.stderr
    assert "secret" not in result.stderr + result.stdout


def test_proposals_over_the_gmacs_budget_never_reach_a_worker(tmp_path):
    from ppsearch.flops import sample_cost
    from ppsearch.flow import SamplerConfig
    from ppsearch.models import PPFlowConfig
    from ppsearch.schedule import Schedule

    config = PPFlowConfig(input_size=(16, 16), in_channels=1, hidden_size=96, depth=6, num_heads=4, num_classes=10)
    budget = sample_cost(config, Schedule.parse("4x4@0.5,2x2"), SamplerConfig(steps=3)).gmacs  # PPF-2 fits, base not
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _run(_launch_args(storage, tmp_path, "n_trials=3", f"max_gmacs={budget}"), tmp_path)
    trials = _trials(storage)
    assert len(trials) == 3 and (trials.gmacs <= budget + 1e-12).all() and "base" not in set(trials.baseline)
    study = optuna.load_study(study_name="toy", storage=storage)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all("over the GMACs budget" in t.user_attrs["error"] for t in pruned)
    assert any(t.user_attrs.get("baseline") == "base" for t in pruned)


def test_a_resumed_study_with_a_larger_budget_proposes_new_schedules(tmp_path, monkeypatch):
    """A seeded sampler must not replay the first launch's proposals (they would all be repeats)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent / "bench"))
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "sampler=random", "trial_function=standin:standin_trial")
    _run([*args, "n_trials=6"], tmp_path)
    first = set(_trials(storage).schedule)
    _run([*args, "n_trials=12"], tmp_path)
    trials = _trials(storage)
    assert len(trials) == 12 and set(trials.state) == {"COMPLETE"} and len(set(trials.schedule) - first) == 6
