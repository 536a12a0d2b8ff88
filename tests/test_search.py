"""The search end to end: real Ray (a local cluster started by the command), a real SQLite
file and a real PostgreSQL server (restarted mid-study in one test), trials that really
fine-tune and score the embedded base, and the faults a cluster user meets: a killed driver,
a killed worker, a second driver, a signal, a trial that runs too long, a bad setting."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ppsearch import query
from ppsearch.cli import main
from ppsearch.config import load_trainer
from postgres import PASSWORD, restart_server

pytestmark = pytest.mark.slow
BENCH = str(Path(__file__).resolve().parent.parent / "bench")

# Trials as small as still meaningful: a 4-step warm start (the toy's default path), 2 fine-tune
# steps from it (warm_start.trial_steps: a trial's length), 40 samples with 3 solver steps.
FAST = ["trainer.steps=2", "trainer.batch_size=8", "trainer.eval.num_samples=40", "trainer.eval.batch_size=40",
        "trainer.eval.steps=3", "trainer.eval.fid.num_splits=2", "warm_start.steps=4", "warm_start.trial_steps=2"]
STANDIN = ["trial_function=standin:standin_trial"]  # bench/standin.py: sleeps trainer.steps ms


def _launch_args(storage, tmp_path, *extra):
    return ["launch", f"storage={storage}", f"checkpoint_dir={tmp_path / 'ck'}", f"export_dir={tmp_path / 'ex'}",
            f"trainer.eval.fid.cache_dir={tmp_path / 'fid'}", "lease_timeout=3", *FAST, *extra]


def _start(args, log):
    """The ppsearch command in its own session (so a kill takes its Ray with it), with bench/ on
    its path for the stand-in trial body."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [BENCH, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "ppsearch.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _run(args, tmp_path, timeout=600, expect=0):
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)
        assert process.wait(timeout) == expect, (tmp_path / "launch.log").read_text()[-3000:]
    return (tmp_path / "launch.log").read_text()


def _study(storage, name="toy"):
    return optuna.load_study(study_name=name, storage=storage)


def _wait_for(predicate, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (KeyError, optuna.exceptions.StorageInternalError):
            pass  # the study is not made yet
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _states(storage):
    return [t.state for t in _study(storage).trials]


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_database")


def test_full_study_front_and_export_round_trip(storage, tmp_path):
    out = _run(_launch_args(storage, tmp_path, "n_trials=5"), tmp_path)
    study = _study(storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 5 and {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert {t.user_attrs.get("baseline") for t in complete} >= {"base", "PPF-2", "PPF-3"}
    assert {t.user_attrs["schedule"] for t in complete if t.user_attrs.get("baseline") == "PPF-3"} == {
        "4x4@0.5,2x4@0.75,2x2"}
    assert sorted(query.front(storage, "toy").trial) == sorted(t.number for t in study.best_trials)
    for t in complete:  # each trial's record and files
        assert t.user_attrs["losses"] and t.user_attrs["attempts"] == 1 and "fid_std" in t.user_attrs
        folder = Path(t.user_attrs["checkpoint"])
        assert (folder / "model.safetensors").is_file() and (folder / "samples.png").is_file()
        assert not (folder / "train_state.pt").exists() or load_trainer("toy").keep_train_state
    assert "front:" in out
    # Export a front trial and train from the file, as a user would.
    export = tmp_path / "picked.yaml"
    main(["export", "--pick", "knee", "--out", str(export), f"storage={storage}"])
    config = load_trainer(str(export))
    assert config.schedule in {t.user_attrs["schedule"] for t in complete}
    main(["train", str(export), "steps=2", f"out_dir={tmp_path / 'full'}", "progress=false"])
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_resume_after_the_driver_is_killed_mid_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=4", "ray.max_concurrent=1", "warm_start.trial_steps=60",
                        "trainer.checkpoint_every=10")
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)
        try:
            _wait_for(lambda: _states(storage).count(TrialState.COMPLETE) >= 1
                      and _states(storage).count(TrialState.RUNNING) >= 1, what="one finished and one running trial")
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    before = _study(storage).trials
    completed = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    interrupted = [t.number for t in before if t.state == TrialState.RUNNING]
    out = _run(args, tmp_path)
    after = _study(storage).trials
    assert "took over the lease of a driver that stopped answering" in out
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, values in completed.items():  # nothing finished was lost or redone
        assert after[number].state == TrialState.COMPLETE and after[number].values == values
    for number in interrupted:  # the interrupted trial finished under its own number, in its own folder
        replicate = "replicate_of" in after[number].user_attrs  # the base's second seed: PRUNED with its FID
        assert after[number].state == (TrialState.PRUNED if replicate else TrialState.COMPLETE)
        assert after[number].user_attrs["attempts"] == 2 and (not replicate or after[number].user_attrs["replicate_fid"])
    assert sum(1 for t in after if t.state == TrialState.COMPLETE) == 4  # the budget holds
    schedules = [t.user_attrs["schedule"] for t in after if t.state == TrialState.COMPLETE]
    assert len(schedules) == len(set(schedules))


def test_a_killed_worker_retries_its_trial(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=3", "ray.max_concurrent=1", "warm_start.trial_steps=60")
    killed = []
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)

        def kill_a_worker():
            """SIGKILL a trial's worker of this test's own Ray (its session is the command's)."""
            ps = subprocess.run(["ps", "-eo", "pid,sid,args"], capture_output=True, text=True).stdout
            pids = [int(line.split()[0]) for line in ps.splitlines()
                    if "ray::run_trial" in line and int(line.split()[1]) == process.pid]
            for pid in pids[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return bool(pids)

        _wait_for(kill_a_worker, what="a Ray worker running a trial")
        assert process.wait(600) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    trials = [t for t in _study(storage).trials if "replicate_of" not in t.user_attrs]  # the base's second seed
    assert killed and {t.state for t in trials} == {TrialState.COMPLETE} and len(trials) == 3
    attempts = sorted(t.user_attrs["attempts"] for t in _study(storage).trials)
    assert attempts == [1] * (len(attempts) - 1) + [2]  # the driver saw the retry


def test_a_trial_that_raises_fails_alone_and_a_study_of_failures_says_why(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # lr = 1e30: the first step throws the weights to ~1e30, the second step's loss is not finite.
    out = _run(_launch_args(storage, tmp_path, "n_trials=3", "trainer.lr=1e30"), tmp_path, expect=2)
    assert out.strip().splitlines()[-1].startswith(  # the warm start comes first, and fails first
        "ppsearch launch: error: the warm start failed: NonFiniteLoss: non-finite training loss")
    assert _study(storage).trials == []
    out = _run(_launch_args(storage, tmp_path, "n_trials=3", "trainer.lr=1e30", "warm_start.steps=0"), tmp_path,
               expect=2)
    trials = _study(storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("NonFiniteLoss: non-finite training loss" in t.user_attrs["error"] for t in trials)
    assert all(any("failed: NonFiniteLoss" in line for line in t.user_attrs["log_tail"]) for t in trials)
    assert out.strip().splitlines()[-1].startswith(
        "ppsearch launch: error: all 3 trials of study 'toy' failed: NonFiniteLoss: non-finite training loss")
    status = subprocess.run([sys.executable, "-m", "ppsearch.cli", "status", f"storage={storage}"],
                            capture_output=True, text=True)
    assert status.returncode == 0 and "NonFiniteLoss" in status.stdout
    # the settings never produced a COMPLETE trial: a relaunch with a sane lr is allowed and runs
    out = _run(_launch_args(storage, tmp_path, "n_trials=2"), tmp_path)
    assert "settings are replaced (" in out and "trainer.lr: 1e+30 -> 0.001" in out
    assert _states(storage).count(TrialState.COMPLETE) == 2


@pytest.mark.parametrize("extra, message", [
    (["study=nope"], "unknown study 'nope'"),
    (["n_trialz=3"], "n_trialz"),
    (["n_trials=0"], "n_trials is 0; it must be >= 1"),
    (["trainer.steps=many"], "trainer.steps"),
    (["trainer.steps=-1"], "trainer.steps is -1; it must be >= 1"),
    (["trainer.batch_size=0"], "trainer.batch_size is 0"),
    (["trainer.eval.num_samples=1"], "trainer.eval.num_samples is 1; it must be >= 10"),
    (["search_space.boundary_step=0"], "search_space.boundary_step is 0.0; it must be > 0"),
    (["search_space.patch_shapes=[3x3,2x2]"], "does not divide"),
    (["ray.num_gpus_per_trial=1"], "no node of the Ray cluster has them; the largest has"),
    (["ray.num_cpus_per_trial=64"], "a trial asks 64 CPUs and 0 GPUs"),
    (["trainer.device=cuda"], "a worker cannot run trials: trainer.device 'cuda'"),
    (["trainer.device=tpu"], "a worker cannot run trials: trainer.device 'tpu'"),
    (["checkpoint_dir=/proc/ppsearch"], "checkpoint_dir /proc/ppsearch is not writable"),
    (["sampler=bayes"], "sampler is 'bayes'"),
    (["trainer.eval.steps=2"], "fewer than the 3 stages"),
    (["storage=postgresql://ppsearch:secret@127.0.0.1:1/none"], "cannot reach database"),
    (["storage='postgresql://ppsearch@127.0.0.1:1/none?password=secret'"], "cannot reach database"),
    (["trainer.base=/nonexistent/base.pt"], "not found"),
])
def test_user_mistakes_are_one_line_before_any_trial(tmp_path, extra, message):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = subprocess.run([sys.executable, "-m", "ppsearch.cli", *_launch_args(storage, tmp_path, *extra)],
                            capture_output=True, text=True, timeout=300)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and message in err[-1] and "Traceback" not in result.stderr, result.stderr
    assert "secret" not in result.stderr + result.stdout
    if (tmp_path / "study.db").exists():
        assert all(t.state != TrialState.COMPLETE for t in _study(storage).trials)


def test_a_checkpoint_dir_that_is_a_file_and_a_broken_study_file_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "broken.yaml").write_text("defaults: [\n  - oops: {")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for args, message in [(_launch_args(storage, tmp_path, f"checkpoint_dir={tmp_path / 'afile' / 'ck'}"),
                           "is under"), (["launch", str(tmp_path / "broken.yaml")], "bad config")]:
        result = subprocess.run([sys.executable, "-m", "ppsearch.cli", *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_proposals_over_the_gmacs_budget_never_reach_a_worker(tmp_path):
    from ppsearch.flops import sample_cost
    from ppsearch.flow import SolverConfig
    from ppsearch.models import PPFlowConfig
    from ppsearch.schedule import Schedule

    config = PPFlowConfig(input_size=(16, 16), in_channels=1, hidden_size=96, depth=6, num_heads=4, num_classes=10)
    budget = sample_cost(config, Schedule.parse("4x4@0.5,2x2"), SolverConfig(steps=3)).gmacs  # PPF-2 fits, base not
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _run(_launch_args(storage, tmp_path, "n_trials=3", f"max_gmacs={budget}", *STANDIN), tmp_path)
    study = _study(storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and all(t.values[0] <= budget + 1e-12 for t in complete)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and "GMACs" in t.user_attrs["reason"]]
    assert pruned and any(t.user_attrs.get("baseline") == "base" for t in pruned)


def test_a_resumed_study_with_a_larger_budget_proposes_new_schedules(tmp_path):
    """A seeded sampler must not replay the first launch's proposals (they would all be repeats)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "sampler=random", *STANDIN)
    _run([*args, "n_trials=6"], tmp_path)
    first = {t.user_attrs["schedule"] for t in _study(storage).trials if t.state == TrialState.COMPLETE}
    _run([*args, "n_trials=12"], tmp_path)
    complete = {t.user_attrs["schedule"] for t in _study(storage).trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 12 and len(complete - first) == 6


def test_a_database_restart_mid_study_loses_and_repeats_nothing(postgres_database, tmp_path):
    args = _launch_args(postgres_database, tmp_path, "n_trials=6", "warm_start.trial_steps=3000", "sampler=random",
                        "database_retry_seconds=120", *STANDIN)
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)
        _wait_for(lambda: _states(postgres_database).count(TrialState.COMPLETE) >= 1, what="a finished trial")
        restart_server(postgres_database, pause=1.0)
        assert process.wait(600) == 0, (tmp_path / "launch.log").read_text()[-3000:]
    out = (tmp_path / "launch.log").read_text()
    trials = _study(postgres_database).trials
    complete = [t.user_attrs["schedule"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 and len(set(complete)) == 6
    assert not [t for t in trials if t.state in (TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)]
    assert PASSWORD not in out


def test_two_drivers_on_one_study_one_runs_the_other_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=4", "warm_start.trial_steps=2000", *STANDIN)
    logs = [open(tmp_path / f"driver{i}.log", "w") for i in range(2)]
    together = [_start(args, logs[0]), _start(args, logs[1])]  # started at the same moment
    codes = sorted(p.wait(600) for p in together)
    texts = [(tmp_path / f"driver{i}.log").read_text() for i in range(2)]
    assert codes == [0, 2], texts
    assert any("is being run by another driver" in t.strip().splitlines()[-1] for t in texts)
    assert _states(storage).count(TrialState.COMPLETE) == 4
    # staggered: a second launch while the first runs
    first = _start([*args[:-1], "n_trials=6", *STANDIN], logs[0])
    _wait_for(lambda: TrialState.RUNNING in _states(storage), what="a running trial")
    second = subprocess.run([sys.executable, "-m", "ppsearch.cli", *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": BENCH})
    assert second.returncode == 2 and "is being run by another driver" in second.stderr
    assert first.wait(600) == 0
    complete = [t.user_attrs["schedule"] for t in _study(storage).trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 == len(set(complete))


def test_a_trial_over_its_time_limit_fails_with_that_reason(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    _run(_launch_args(storage, tmp_path, "n_trials=1", "warm_start.trial_steps=60000", "ray.trial_timeout=3", *STANDIN),
         tmp_path, expect=2)
    trial = _study(storage).trials[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"] == "timed out after 3 s (ray.trial_timeout)"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_driver_in_one_line_and_the_study_resumes(tmp_path, signum, code):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _launch_args(storage, tmp_path, "n_trials=1", "replicate_base=false", "warm_start.trial_steps=200",
                        "trainer.checkpoint_every=20", "trainer.log_every=10")
    with open(tmp_path / "launch.log", "a") as log:
        process = _start(args, log)
        _wait_for(lambda: any("step 20/" in p.read_text() for p in (tmp_path / "ck").rglob("trial.log")),
                  what="a trial past its first checkpoint")
        process.send_signal(signum)
        assert process.wait(120) == code
    out = (tmp_path / "launch.log").read_text()
    name = signal.Signals(signum).name
    assert "Traceback" not in out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"ppsearch launch: stopped by {name}: 1 running trial(s) cancelled") and \
        "resume with: ppsearch launch" in last
    running = [t for t in _study(storage).trials if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0].user_attrs["interrupted"].startswith(name)
    _run(args, tmp_path)
    trial = _study(storage).trials[running[0].number]
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["attempts"] == 2
    log_text = (Path(trial.user_attrs["checkpoint"]) / "trial.log").read_text()
    assert "interrupted: checkpoint at step" in log_text and "resuming from step" in log_text
