"""Successive halving (rungs, promotions, the front of the highest rungs) and the warm start
(one variant with every shape of the space, trials started from it)."""
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from ppsearch import query
from ppsearch.config import HalvingConfig, load_study, load_trainer
from ppsearch.fidelity import exclusive_hypervolume, non_dominated, promotion, rung_trainer
from ppsearch.runners import InlineRunner, Shared
from ppsearch.schedule import PatchShape, ScheduleError
from ppsearch.search import Driver
from ppsearch.space import SearchSpace
from ppsearch.train import build_model
from ppsearch.trial import run_trial
from ppsearch.warm_start import Mixture, run_warm_start, warm_trainer

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))
from standin import standin_trial  # noqa: E402
from test_query import run_cli, study_words  # noqa: E402

SMALL = ["search_space.stage_counts=[1,2,3]", "search_space.patch_shapes=[8x8,4x4,2x2]",
         "search_space.boundary_min=0.25", "search_space.boundary_max=0.75", "search_space.boundary_step=0.25"]
TINY = ["steps=4", "batch_size=8", "threads=1", "eval.num_samples=40", "eval.batch_size=40", "eval.steps=4"]


def _study_config(tmp_path, *overrides):
    return load_study("toy", [f"storage=sqlite:///{tmp_path / 'study.db'}", f"checkpoint_dir={tmp_path / 'ck'}",
                              f"export_dir={tmp_path / 'ex'}", "replicate_base=false", "warm_start.steps=0", *SMALL, *overrides])


def test_rungs_divide_steps_and_samples_by_eta_and_the_top_rung_is_the_trainer():
    trainer = load_trainer("toy")  # 200 steps, 500 samples
    halving = HalvingConfig(rungs=3, eta=3, min_samples=100)
    low, middle, top = (rung_trainer(trainer, halving, r) for r in range(3))
    assert (low.steps, low.eval.num_samples, low.keep_train_state) == (23, 100, True)
    assert (middle.steps, middle.eval.num_samples, middle.eval.batch_size) == (67, 167, 167)
    assert top is trainer


def test_promotion_takes_the_rungs_non_dominated_one_in_eta_most_hypervolume_first():
    halving = HalvingConfig(rungs=2, eta=2)
    # (trial, gmacs, fid): a and c are non-dominated; b is dominated by a
    results = [{"a": (0, 1.0, 10.0), "b": (1, 2.0, 11.0), "c": (2, 3.0, 2.0)}, {}]
    assert promotion([{"a": (0, 1.0, 10.0)}, {}], [set(), set()], halving) is None  # 1 result: no room
    points = {k: v[1:] for k, v in results[0].items()}
    assert sorted(non_dominated(points)) == ["a", "c"]
    # reference 1.1 x the worst of each (3.3, 12.1): a owns (3 - 1) x (12.1 - 10), c (3.3 - 3) x (10 - 2)
    assert exclusive_hypervolume(points) == pytest.approx({"a": 4.2, "c": 2.4})
    assert promotion(results, [set(), set()], halving) == ("a", 0, 1)
    assert promotion(results, [{"a"}, set()], halving) is None  # 3 // 2 = 1 promotion so far
    results[0]["d"] = (3, 0.5, 20.0)  # 4 results: room for a second; d owns (1 - 0.5) x (22 - 20) = 1 < c's 2.4
    assert promotion(results, [{"a"}, set()], halving) == ("c", 2, 1)


def test_halving_promotes_from_the_lower_rung_and_the_front_holds_each_schedules_highest_rung(tmp_path, capsys):
    seen = []

    def recording(trainer, schedule, out_dir, shared):
        seen.append((schedule, trainer.steps, trainer.eval.num_samples, trainer.init_from, out_dir))
        result = standin_trial(trainer, schedule, out_dir, shared)
        return {**result, "fid": result["fid"] + 100.0 / trainer.steps}  # more steps, better FID

    config = _study_config(tmp_path, "n_trials=12", "trainer.steps=40", "halving.rungs=2", "halving.eta=3")
    Driver(config, log=lambda line: None, runner=InlineRunner(recording, 1)).run()
    study = optuna.load_study(study_name="toy", storage=config.storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 12
    low = [t for t in complete if t.user_attrs["rung"] == 0]
    high = [t for t in complete if t.user_attrs["rung"] == 1]
    assert high and len(high) <= len(low) // 3  # one in eta
    assert {t.user_attrs["fidelity"]["steps"] for t in low} == {14} and {t.user_attrs["fidelity"]["steps"] for t in high} == {40}
    for t in high:  # promoted from a COMPLETE rung-0 trial of the same schedule, starting from its folder
        source = study.trials[t.user_attrs["promoted_from"]]
        assert source.user_attrs["schedule"] == t.user_attrs["schedule"] and source.user_attrs["rung"] == 0
        run = next(s for s in seen if s[4] == t.user_attrs["folder"])
        assert run[1:4] == (40, 500, source.user_attrs["folder"]) and run[4] != run[3]
    front = query.front(config)
    assert set(front.rung) <= {0, 1}
    superseded = {t.number for t in low if t.user_attrs["schedule"] in {h.user_attrs["schedule"] for h in high}}
    assert superseded and not superseded & set(front.trial)  # a promoted schedule shows its highest rung only
    # every promoted schedule's rung-1 point dominates its rung-0 one here, so Optuna's front agrees
    assert sorted(t.number for t in study.best_trials) == sorted(front.trial)
    code, out, _ = run_cli(capsys, "status", *study_words(config))
    assert code == 0 and f"successive halving: 2 rungs, eta 3; results per rung: rung 0: {len(low)}, rung 1: {len(high)}" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("schedule"))
    assert header.split() == ["schedule", "GMACs", "speed-up", "FID", "rung", "trial", "baseline"]


def test_a_promoted_trial_ends_where_a_trial_run_at_its_rung_from_the_start_ends(tmp_path):
    """The rung above resumes the rung below's weights and optimiser: the same weights, so the
    same FID, as a trial trained at the upper rung from the base."""
    halving = HalvingConfig(rungs=2, eta=2, min_samples=20)
    trainer = load_trainer("toy", TINY)
    lower = run_trial(rung_trainer(trainer, halving, 0), "4x4@0.5,2x2", str(tmp_path / "rung0"))
    promoted = run_trial(replace(trainer, init_from=str(tmp_path / "rung0")), "4x4@0.5,2x2", str(tmp_path / "rung1"))
    direct = run_trial(trainer, "4x4@0.5,2x2", str(tmp_path / "direct"))
    assert lower["fid"] != direct["fid"]
    assert promoted["fid"] == pytest.approx(direct["fid"], rel=1e-5)
    assert promoted["compute"]["train_gmacs"] == pytest.approx(direct["compute"]["train_gmacs"] / 2)
    assert "starting from" in (tmp_path / "rung1" / "trial.log").read_text()


def test_a_mixture_routes_each_sample_to_a_shape_the_space_allows_at_its_time():
    space = SearchSpace(load_study("toy").search_space, PatchShape(2, 2), (8, 8))
    mixture = Mixture.of_space(space)
    assert str(mixture) == "8x8|4x4|2x4|4x2|2x2@0.9,2x2" and Mixture.parse(str(mixture)) == mixture
    t = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    patches = mixture.patches(t, torch.Generator().manual_seed(1))
    late = {str(p) for p, ti in zip(patches, t) if ti >= 0.9}
    early = [str(p) for p, ti in zip(patches, t) if ti < 0.9]
    assert late == {"2x2"} and set(early) == {"8x8", "4x4", "2x4", "4x2", "2x2"}
    assert min(early.count(s) for s in set(early)) > 0.8 * len(early) / 5  # uniform among the allowed
    for bad in ("8x8|4x4@0.9", "8x8@0.9,2x2@0.5,2x2", "8x8|zz@0.9,2x2"):
        with pytest.raises(ScheduleError):
            Mixture.parse(bad)


@pytest.mark.slow
def test_a_warm_started_study_trains_the_mixture_once_and_starts_every_trial_from_it(tmp_path, capsys):
    config = _study_config(tmp_path, "n_trials=3", "sampler=random", "warm_start.steps=6",
                           "warm_start.trial_steps=2", *[f"trainer.{o}" for o in TINY])
    calls = []

    def counting(trainer, schedule, out_dir, shared):
        calls.append((schedule, trainer.steps, trainer.base))
        return run_trial(trainer, schedule, out_dir, shared)

    driver = Driver(config, log=lambda line: None, runner=InlineRunner(counting, 1))
    driver.run()
    warm = optuna.load_study(study_name="toy", storage=config.storage).user_attrs["warm_start"]
    assert warm["steps"] == 6 and warm["mixture"] == "8x8|4x4|2x2@0.75,2x2" and Path(warm["checkpoint"]).is_file()
    assert len(calls) == 3 and all(steps == 2 and base == warm["checkpoint"] for _, steps, base in calls)
    trials = query.trials(config)
    assert (trials.state == "COMPLETE").sum() == 3
    # a trial's weights hold its own shapes only, and started from the warm start's levels
    from ppsearch.checkpoint import load_base

    four = trials[trials.schedule.str.startswith("4x4")]
    if len(four):
        model = load_base(Path(four.checkpoint.iloc[0]) / "model.safetensors")
        assert sorted(model.levels) == sorted({"2x2", "4x4"})
    # a second launch reads the warm start back instead of training it again
    config = _study_config(tmp_path, "n_trials=4", "sampler=random", "warm_start.steps=6",
                           "warm_start.trial_steps=2", *[f"trainer.{o}" for o in TINY])
    lines = []
    Driver(config, log=lines.append, runner=InlineRunner(counting, 1)).run()
    assert (query.trials(config).state == "COMPLETE").sum() == 4
    assert any(line.startswith("warm start ready") for line in lines)
    code, out, _ = run_cli(capsys, "status", *study_words(config))
    assert code == 0 and "warm start: 6 steps of 8x8|4x4|2x2@0.75,2x2" in out and "every trial fine-tunes 2 steps" in out
    assert "spent on 4 trials run and the warm start" in out


def test_the_warm_start_is_the_base_trained_under_the_mixture_and_resumes_finished(tmp_path):
    trainer = load_trainer("toy", TINY)
    out = str(tmp_path / "warm")
    first = run_warm_start(warm_trainer(trainer, 3), "8x8|4x4|2x2@0.75,2x2", out)
    assert sorted(first["model"].levels) == ["2x2", "4x4", "8x8"] and first["steps"] == 3
    assert all(p.requires_grad for p in first["model"].parameters())  # a base to fine-tune
    again = run_warm_start(warm_trainer(trainer, 3), "8x8|4x4|2x2@0.75,2x2", out)
    assert again["seconds"] < first["seconds"] and all(
        torch.equal(a, b) for a, b in zip(first["model"].state_dict().values(), again["model"].state_dict().values()))
    variant = build_model(replace(trainer, schedule="4x4@0.5,2x2"), (1, 16, 16), 10, base=again["model"])
    assert sorted(variant.levels) == ["2x2", "4x4"]  # its own shapes; the warm start's 4x4 level, not a fresh one
    warm_level, fresh = again["model"].levels["4x4"], build_model(replace(trainer, schedule="4x4@0.5,2x2"),
                                                                  (1, 16, 16), 10).levels["4x4"]
    assert torch.equal(variant.levels["4x4"].x_embedder.proj.weight, warm_level.x_embedder.proj.weight)
    assert not torch.equal(warm_level.x_embedder.proj.weight, fresh.x_embedder.proj.weight)


def test_a_driver_killed_during_a_promotion_resumes_it_at_its_rung_from_the_lower_rungs_weights(tmp_path):
    class Killed(BaseException):
        pass

    seen, killed = [], []

    def dies_on_the_first_promotion(trainer, schedule, out_dir, shared):
        if trainer.init_from and not killed:
            killed.append(schedule)
            raise Killed
        seen.append((schedule, trainer.steps, trainer.init_from, out_dir))
        return standin_trial(trainer, schedule, out_dir, shared)

    config = _study_config(tmp_path, "n_trials=8", "trainer.steps=30", "halving.rungs=2", "halving.eta=3")
    with pytest.raises(Killed):
        Driver(config, log=lambda line: None, runner=InlineRunner(dies_on_the_first_promotion, 1)).run()
    study = optuna.load_study(study_name="toy", storage=config.storage)
    running = [t for t in study.trials if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0].user_attrs["rung"] == 1
    lines = []
    Driver(config, log=lines.append, runner=InlineRunner(dies_on_the_first_promotion, 1)).run()
    again = optuna.load_study(study_name="toy", storage=config.storage).trials[running[0].number]
    assert again.state == TrialState.COMPLETE and again.user_attrs["attempts"] == 2
    source = study.trials[again.user_attrs["promoted_from"]]
    assert (again.user_attrs["schedule"], 30, source.user_attrs["folder"], again.user_attrs["folder"]) in seen
    assert any(f"trial {again.number} " in line and "left running" in line for line in lines)
    complete = [t for t in optuna.load_study(study_name="toy", storage=config.storage).trials
                if t.state == TrialState.COMPLETE]
    assert len(complete) == 8 and len({(t.user_attrs["schedule"], t.user_attrs["rung"]) for t in complete}) == 8


def test_a_replicate_whose_worker_died_is_retried_as_the_replicate(tmp_path):
    from ppsearch.runners import WorkerLost

    seen = []

    def loses_the_replicate_once(trainer, schedule, out_dir, shared):
        seen.append((schedule, trainer.seed, out_dir))
        if trainer.seed == 1 and sum(1 for s in seen if s[1] == 1) == 1:
            raise WorkerLost("node died")
        return standin_trial(trainer, schedule, out_dir, shared)

    config = _study_config(tmp_path, "n_trials=3", "replicate_base=true")
    Driver(config, log=lambda line: None, runner=InlineRunner(loses_the_replicate_once, 1)).run()
    study = optuna.load_study(study_name="toy", storage=config.storage)
    replicate = [t for t in study.trials if "replicate_of" in t.user_attrs]
    assert len(replicate) == 1 and replicate[0].state == TrialState.PRUNED and replicate[0].user_attrs["attempts"] == 2
    assert [s for s in seen if s[0] == "2x2"][1:] == [("2x2", 1, s[2]) for s in seen if s[1] == 1]  # both seed + 1
    assert sum(1 for t in study.trials if t.state == TrialState.COMPLETE) == 3


def test_prune_off_front_keeps_the_weights_a_promotion_may_still_start_from(tmp_path):
    def writing(trainer, schedule, out_dir, shared):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "train_state.pt"):
            (Path(out_dir) / name).write_bytes(b"w")
        return {**standin_trial(trainer, schedule, out_dir, shared), "checkpoint": out_dir}

    config = _study_config(tmp_path, "n_trials=10", "halving.rungs=2", "halving.eta=3", "prune_off_front=true")
    Driver(config, log=lambda line: None, runner=InlineRunner(writing, 1)).run()
    trials, front = query.trials(config), set(query.front(config).trial)
    promoted = set(trials.promoted_from.dropna().astype(int))
    for t in trials[trials.state == "COMPLETE"].itertuples():
        kept = (Path(t.checkpoint) / "train_state.pt").exists()
        waiting = t.rung == 0 and t.trial not in promoted  # may still be promoted
        assert kept == (t.trial in front or waiting), (t.trial, t.schedule, t.rung)
    assert promoted - front  # a promoted source off the front lost its weights
