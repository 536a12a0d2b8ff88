import optuna
import pytest

from ppsearch.config import SearchSpaceConfig
from ppsearch.schedule import PatchShape, Schedule
from ppsearch.space import SearchSpace, SearchSpaceError, baselines, merged

optuna.logging.set_verbosity(optuna.logging.WARNING)
BASE = PatchShape(2, 2)


def _space(**kwargs):
    return SearchSpace(SearchSpaceConfig(**kwargs), BASE, (16, 16))


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=0),
                                     optuna.samplers.TPESampler(multivariate=True, group=True, seed=0,
                                                                n_startup_trials=5)])
def test_every_proposal_is_a_valid_schedule(sampler):
    space = _space(patch_shapes=["8x8", "4x4", "4x2", "2x4", "2x2"], guidance_scales=[1.0, 2.0, 4.0])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    seen = set()
    for i in range(120):
        trial = study.ask()
        schedule = space.suggest(trial)  # Schedule() itself rejects anything invalid
        schedule.check_for((16, 16), BASE)
        assert schedule.stages[-1].patch == BASE
        assert all(t in space.grid for t in schedule.boundaries)
        assert len(schedule.stages) <= 3
        for a, b in zip(schedule.stages, schedule.stages[1:]):
            assert (a.patch, a.guidance) != (b.patch, b.guidance)  # merged
        assert all(s.guidance in (None, 2.0, 4.0) for s in schedule.stages)
        seen.add(str(schedule))
        study.tell(trial, [float(i), float(-i)])
    assert len(seen) > 60


def test_params_reproduce_the_schedule():
    space = _space(guidance_scales=[1.0, 1.5])
    study = optuna.create_study(directions=["minimize", "minimize"])
    texts = ["2x2", "4x4@0.5,2x2", "4x4@0.5,2x4@0.75,2x2", "8x8@0.1:cfg1.5,4x2@0.9,2x2:cfg1.5"]
    for text in texts:
        study.enqueue_trial(space.params(Schedule.parse(text)))
    assert [str(space.suggest(study.ask())) for _ in texts] == texts


@pytest.mark.parametrize("text", ["4x4@0.52,2x2", "4x4@0.5,4x2", "3x3@0.5,2x2", "4x4@0.5:cfg3.0,2x2",
                                  "8x8@0.2,4x4@0.4,2x4@0.6,2x2"])
def test_schedules_outside_the_space_have_no_params(text):
    space = SearchSpace(SearchSpaceConfig(), BASE, (48, 48))
    assert space.params(Schedule.parse(text)) is None


def test_unpinned_space_draws_every_stage():
    space = _space(pin_last_to_base=False, stage_counts=[2], patch_shapes=["4x4", "2x2"])
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    texts = {str(space.suggest(study.ask())) for _ in range(40)}
    assert "4x4" in texts  # 4x4 twice merges into one stage
    assert any(t.startswith("4x4@") and t.endswith(",2x2") for t in texts)


def test_merged_joins_equal_neighbours():
    schedule = Schedule.parse("4x4@0.3,4x4@0.6,2x2@0.8,2x2")
    assert str(merged(schedule)) == "4x4@0.6,2x2"
    assert str(merged(Schedule.parse("4x4@0.3:cfg2.0,4x4@0.6,2x2"))) == "4x4@0.3:cfg2.0,4x4@0.6,2x2"


def test_baselines_adapt_to_the_base_patch():
    assert {k: str(v) for k, v in baselines(BASE).items()} == {
        "base": "2x2", "PPF-2": "4x4@0.5,2x2", "PPF-3": "4x4@0.5,2x4@0.75,2x2"}
    assert str(baselines(PatchShape(1, 1))["PPF-3"]) == "2x2@0.5,1x2@0.75,1x1"


@pytest.mark.parametrize("kwargs, message", [
    (dict(patch_shapes=["3x3", "2x2"]), "does not divide"),
    (dict(patch_shapes=["1x1", "2x2"]), "cannot be initialised"),
    (dict(boundary_min=0.0), "inside \\(0, 1\\)"),
    (dict(boundary_max=1.0), "inside \\(0, 1\\)"),
    (dict(stage_counts=[0]), "stage_counts"),
    (dict(patch_shapes=["2x2"]), "leaves no patch"),
    (dict(guidance_scales=[]), "guidance_scales is empty"),
])
def test_bad_spaces(kwargs, message):
    with pytest.raises(SearchSpaceError, match=message):
        _space(**kwargs)


def test_schedules_lists_each_distinct_schedule_once():
    space = _space(patch_shapes=["8x8", "4x4", "2x2"], boundary_min=0.25, boundary_max=0.75, boundary_step=0.25)
    schedules = space.schedules()
    texts = [str(s) for s in schedules]
    # 2x2; 8x8 or 4x4 before it at 3 boundaries; 8x8 then 4x4 at 3 boundary pairs (8x8,8x8 merges).
    assert len(texts) == len(set(texts)) == 1 + 2 * 3 + 3
    assert {"2x2", "8x8@0.25,2x2", "4x4@0.75,2x2", "8x8@0.25,4x4@0.5,2x2", "8x8@0.5,4x4@0.75,2x2"} <= set(texts)
    for schedule in schedules:
        assert str(space.suggest(optuna.trial.FixedTrial(space.params(schedule)))) == str(schedule)
