"""The search driver's loop without Ray: trials run inline (InlineRunner) with bench/standin.py's
body (the schedule's GMACs, a synthetic FID), on a real SQLite file."""
import sys
from pathlib import Path

import pytest

from ppsearch.config import load_study
from ppsearch.search import Driver, InlineRunner
from ppsearch.store import Store

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from standin import standin_trial  # noqa: E402

SMALL = ["search_space.stage_counts=[1,2,3]", "search_space.patch_shapes=[8x8,4x4,2x2]",
         "search_space.boundary_min=0.25", "search_space.boundary_max=0.75", "search_space.boundary_step=0.25",
         "trainer.steps=0"]


def _driver(tmp_path, *overrides, function=standin_trial, slots=1):
    config = load_study("toy", [f"storage=sqlite:///{tmp_path / 'study.db'}", f"checkpoint_dir={tmp_path}",
                                *SMALL, *overrides])
    lines = []
    return Driver(config, log=lines.append, runner=InlineRunner(function, slots)), lines


@pytest.mark.parametrize("slots", [1, 2])
def test_the_grid_sampler_evaluates_every_schedule_once_then_stops(tmp_path, slots):
    driver, lines = _driver(tmp_path, "sampler=grid", "n_trials=1000", slots=slots)
    driver.run()
    trials = Store(driver.config.storage).trials("toy")
    expected = {str(s) for s in driver.space.schedules()}
    assert len(trials) == len(expected) == 10
    assert set(trials.schedule) == expected and set(trials.state) == {"COMPLETE"}
    assert lines[-1] == "the grid is spent: every one of its points was proposed"
    proposals = driver.study.get_trials(deepcopy=False)
    assert len([t for t in proposals if "grid_id" in t.system_attrs]) == 3 * 2 * 2 * 3 * 3  # every grid point


def test_inline_trials_that_raise_fail_with_their_message(tmp_path):
    def broken(trainer, schedule, out_dir):
        raise RuntimeError(f"no luck with {schedule}")

    driver, lines = _driver(tmp_path, "n_trials=3", function=broken)
    driver.run()
    trials = Store(driver.config.storage).trials("toy")
    assert list(trials.state) == ["FAIL"] * 3
    assert all(e == f"RuntimeError: no luck with {s}" for e, s in zip(trials.error, trials.schedule))
