"""The search driver without Ray: trials run inline (InlineRunner) with bench/standin.py's body
(the schedule's GMACs, a synthetic FID), on a real SQLite file. What the study records, the
lease, resuming, repeats, settings and database failures."""
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ppsearch import query
from ppsearch.config import ConfigError, load_study
from ppsearch.runners import InlineRunner
from ppsearch.search import Driver, StudyFailed, trial_folder
from ppsearch.store import DatabaseUnreachable, LeaseHeld, Store

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from standin import standin_trial  # noqa: E402

SMALL = ["search_space.stage_counts=[1,2,3]", "search_space.patch_shapes=[8x8,4x4,2x2]",
         "search_space.boundary_min=0.25", "search_space.boundary_max=0.75", "search_space.boundary_step=0.25",
         "trainer.steps=1"]


def _config(tmp_path, *overrides):
    return load_study("toy", [f"storage=sqlite:///{tmp_path / 'study.db'}", f"checkpoint_dir={tmp_path / 'ck'}",
                              f"export_dir={tmp_path / 'ex'}", "database_retry_seconds=2", "replicate_base=false", "warm_start.steps=0", *SMALL,
                              *overrides])


def _driver(tmp_path, *overrides, function=standin_trial, slots=1):
    lines = []
    return Driver(_config(tmp_path, *overrides), log=lines.append, runner=InlineRunner(function, slots)), lines


def _study(tmp_path, name="toy"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


@pytest.mark.parametrize("slots", [1, 2])
def test_the_grid_sampler_evaluates_every_schedule_once_then_stops(tmp_path, slots):
    driver, lines = _driver(tmp_path, "sampler=grid", "n_trials=1000", slots=slots)
    driver.run()
    study = _study(tmp_path)
    expected = {str(s) for s in driver.space.schedules()}
    assert len(study.trials) == len(expected) == 10  # no repeat: one trial per schedule
    assert {t.user_attrs["schedule"] for t in study.trials} == expected
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert lines[-1] == "the grid is spent: every schedule of the space was proposed"


def test_inline_trials_that_raise_fail_with_their_message(tmp_path):
    def broken(trainer, schedule, out_dir, shared):
        raise RuntimeError(f"no luck with {schedule}")

    driver, lines = _driver(tmp_path, "n_trials=3", function=broken)
    with pytest.raises(StudyFailed, match="all 3 trials of study 'toy' failed: 3 different errors"):
        driver.run()
    trials = query.trials(driver.config)
    assert list(trials.state) == ["FAIL"] * 3
    assert all(e == f"RuntimeError: no luck with {s}" for e, s in zip(trials.error, trials.schedule))


def test_repeats_are_pruned_never_a_second_front_point(tmp_path):
    driver, _ = _driver(tmp_path, "n_trials=8", "sampler=random", slots=2)
    driver.run()
    study = _study(tmp_path)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    repeats = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert len(complete) == 8 and len({t.user_attrs["schedule"] for t in complete}) == 8
    assert repeats and all(t.user_attrs["reason"].startswith("repeat of trial") for t in repeats)
    numbers = {t.number for t in complete}
    assert all(t.user_attrs["repeat_of"] in numbers for t in repeats)
    # Optuna's front is ppsearch's, and every trial is counted the same everywhere
    assert sorted(t.number for t in study.best_trials) == sorted(query.front(driver.config).trial)
    assert len(query.trials(driver.config)) == len(study.trials)
    # parameters read as what they are
    params = [t.params for t in complete if t.params["stages"] > 1]
    assert all(isinstance(p["boundary_0"], float) and isinstance(p["patch_0"], str) for p in params)


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path):
    first, _ = _driver(tmp_path, "n_trials=2")
    with pytest.raises(LeaseHeld, match=r"being run by another driver: .* pid \d+, since .*heartbeat"):
        _driver(tmp_path, "n_trials=2")
    first.run()  # releases the lease
    second, _ = _driver(tmp_path, "n_trials=3")
    second.run()
    assert sum(1 for t in _study(tmp_path).trials if t.state == TrialState.COMPLETE) == 3


def test_a_stale_lease_is_taken_over_and_its_running_trials_resume_under_their_numbers(tmp_path):
    dead, _ = _driver(tmp_path, "n_trials=3", "lease_timeout=0.5")
    study = dead.study
    trial = study.ask({"stages": optuna.distributions.CategoricalDistribution([1, 2, 3])})
    for key, value in {"schedule": "2x2", "settings": dead.settings, "baseline": "base"}.items():
        trial.set_user_attr(key, value)
    dead.heartbeat.stop()  # the driver dies: it never renews its lease nor releases it
    import time

    time.sleep(1.0)
    seen = []

    def recording(trainer, schedule, out_dir, shared):
        seen.append((schedule, out_dir))
        return standin_trial(trainer, schedule, out_dir, shared)

    driver, lines = _driver(tmp_path, "n_trials=3", "lease_timeout=0.5", function=recording)
    assert any("took over the lease" in line for line in lines)
    driver.run()
    resumed = _study(tmp_path).trials[trial.number]
    assert resumed.state == TrialState.COMPLETE and resumed.user_attrs["attempts"] == 2
    assert seen[0] == ("2x2", str(trial_folder(str(tmp_path / "ck"), "toy", driver.uid, "2x2")))
    assert sum(1 for t in _study(tmp_path).trials if t.user_attrs.get("schedule") == "2x2"
               and t.state == TrialState.COMPLETE) == 1  # not repeated


def test_a_new_study_reusing_a_name_never_reads_the_old_ones_folders(tmp_path):
    first, _ = _driver(tmp_path, "n_trials=1")
    first.run()
    optuna.delete_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'study.db'}")
    second, _ = _driver(tmp_path, "n_trials=1", "trainer.lr=1e-6")
    assert second.uid != first.uid
    folder = lambda d: trial_folder(str(tmp_path / "ck"), "toy", d.uid, "2x2")  # noqa: E731
    assert folder(first) != folder(second)


def test_changed_settings_name_the_keys_with_both_values(tmp_path):
    _driver(tmp_path, "n_trials=1")[0].run()
    with pytest.raises(ConfigError, match=r"trainer.lr: 0.001 -> 1e-06"):
        _driver(tmp_path, "n_trials=2", "trainer.lr=1e-6")
    # the failed start released its lease: the original settings resume at once
    _driver(tmp_path, "n_trials=2")[0].run()


def test_settings_that_never_produced_a_complete_trial_may_be_corrected(tmp_path):
    def broken(trainer, schedule, out_dir, shared):
        raise RuntimeError("bad settings")

    with pytest.raises(StudyFailed, match="all 2 trials .* failed: RuntimeError: bad settings"):
        _driver(tmp_path, "n_trials=2", "trainer.lr=1e30", function=broken)[0].run()
    driver, lines = _driver(tmp_path, "n_trials=2")
    assert any("settings are replaced (trainer.lr: 1e+30 -> 0.001)" in line for line in lines)
    driver.run()
    trials = query.trials(driver.config)
    assert (trials.state == "COMPLETE").sum() == 2 and (trials.state == "FAIL").sum() == 2


def test_a_database_write_that_fails_once_is_retried(tmp_path, monkeypatch):
    driver, lines = _driver(tmp_path, "n_trials=2")
    tell = driver.study.tell
    failures = [0]

    def flaky(*args, **kwargs):
        if failures[0] == 0:
            failures[0] += 1
            raise optuna.exceptions.StorageInternalError("server closed the connection unexpectedly")
        return tell(*args, **kwargs)

    monkeypatch.setattr(driver.study, "tell", flaky)
    driver.run()
    assert failures[0] == 1 and any(line.startswith("database unreachable (telling") for line in lines)
    assert sum(1 for t in _study(tmp_path).trials if t.state == TrialState.COMPLETE) == 2


def test_a_database_write_that_fails_for_good_stops_the_driver_and_loses_nothing(tmp_path, monkeypatch):
    driver, _ = _driver(tmp_path, "n_trials=3", "database_retry_seconds=1")

    def down(*args, **kwargs):
        raise optuna.exceptions.StorageInternalError("could not connect to server")

    monkeypatch.setattr(driver.study, "tell", down)
    with pytest.raises(DatabaseUnreachable, match="unreachable for telling a result"):
        driver.run()
    running = [t for t in _study(tmp_path).trials if t.state == TrialState.RUNNING]
    assert len(running) == 1  # its result is in its folder; the next launch tells it
    driver, _ = _driver(tmp_path, "n_trials=3")
    driver.run()
    trials = _study(tmp_path).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3 and not any(
        t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    assert trials[running[0].number].state == TrialState.COMPLETE


def test_the_budget_counts_results_under_the_current_settings(tmp_path):
    _driver(tmp_path, "n_trials=3")[0].run()
    _driver(tmp_path, "n_trials=5")[0].run()
    trials = query.trials(_config(tmp_path))
    assert (trials.state == "COMPLETE").sum() == 5 and set(trials.state) <= {"COMPLETE", "PRUNED"}
    assert set(trials.baseline.dropna()) == {"base", "PPF-2"}  # PPF-3 has a 2x4 stage: outside SMALL


def test_prune_off_front_deletes_the_weights_of_dominated_trials_only(tmp_path):
    def with_weights(trainer, schedule, out_dir, shared):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"w" * 1000)
        (Path(out_dir) / "samples.png").write_bytes(b"png")
        return {**standin_trial(trainer, schedule, out_dir, shared), "checkpoint": out_dir}

    driver, _ = _driver(tmp_path, "n_trials=6", "prune_off_front=true", function=with_weights)
    driver.run()
    study = _study(tmp_path)
    front = {t.number for t in study.best_trials}
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            folder = Path(t.user_attrs["checkpoint"])
            assert (folder / "model.safetensors").exists() == (t.number in front)
            assert (folder / "samples.png").exists()
    assert len(front) < sum(1 for t in study.trials if t.state == TrialState.COMPLETE)


def test_the_base_is_trained_twice_for_the_training_noise_never_a_front_point(tmp_path):
    seen = []

    def recording(trainer, schedule, out_dir, shared):
        seen.append((schedule, trainer.seed, out_dir))
        result = standin_trial(trainer, schedule, out_dir, shared)
        return {**result, "fid": result["fid"] + trainer.seed}  # another seed, another FID

    driver, _ = _driver(tmp_path, "n_trials=4", "replicate_base=true", function=recording)
    driver.run()
    study = _study(tmp_path)
    replicate = [t for t in study.trials if "replicate_of" in t.user_attrs]
    assert len(replicate) == 1 and replicate[0].state == TrialState.PRUNED
    original = study.trials[replicate[0].user_attrs["replicate_of"]]
    assert original.user_attrs["schedule"] == "2x2" and original.state == TrialState.COMPLETE
    assert replicate[0].user_attrs["replicate_fid"] == original.values[1] + 1
    assert replicate[0].number not in {t.number for t in study.best_trials}
    assert sum(1 for t in study.trials if t.state == TrialState.COMPLETE) == 4  # not counted in the budget
    seeds = {(s, seed) for s, seed, _ in seen if s == "2x2"}
    assert seeds == {("2x2", 0), ("2x2", 1)} and len({d for _, _, d in seen}) == len(seen)  # own folders
    noise = query.training_noise(driver.config)
    assert noise["pairs"] == 1 and noise["std"] == pytest.approx(1 / 2 ** 0.5, rel=0.01)
