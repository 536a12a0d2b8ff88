"""The search driver. One process owns the Optuna study (ask / tell; the only writer of the
database); every trial runs as a Ray task. Killing the driver loses no finished trial: the
next ``launch`` of the same study fails the trials it left RUNNING, queues their schedules
again and goes on until the trial budget is spent."""
from __future__ import annotations

import importlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from .config import ConfigError, StudyConfig
from .data import load_dataset
from .flops import sample_cost
from .flow import SamplerConfig
from .query import CONFIG_ATTR
from .schedule import Schedule
from .space import SearchSpace, baselines
from .store import Store, TrialRecord, hidden_password
from .train import base_model

# Settings that decide what a trial's numbers mean: a study cannot change them on resume.
_FIXED = ("search_space", "trainer")
_MAX_IDLE_PROPOSALS = 200  # proposals in a row that add no new schedule: the space is spent
optuna.logging.set_verbosity(optuna.logging.WARNING)  # ppsearch logs each trial itself
warnings.filterwarnings("ignore", category=ExperimentalWarning)  # TPE's group, metric names


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``name``. TPE is multivariate with grouping, which models the
    conditional space (parameters that exist for some stage counts only) jointly; ``grid``
    walks every point of the space's parameter grid once, in a seeded random order."""
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "grid":
        return AskTellGridSampler(space.grid_search_space(), seed=seed)
    raise ConfigError(f"unknown sampler {name!r}: one of tpe, nsga2, random, gp, grid")


class AskTellGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for a study driven by ask and tell: the driver stops at the end of
    the grid itself (the stock sampler calls ``Study.stop``, which works inside ``optimize`` only)."""

    def after_trial(self, study, trial, state, values):
        pass


@dataclass
class Proposal:
    trial: optuna.trial.Trial
    schedule: Schedule
    baseline: str | None


def _error_line(err: BaseException) -> str:
    """One line for a failed trial: the original exception inside Ray's wrapper."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


class Driver:
    """Runs (or resumes) one study to its trial budget."""

    def __init__(self, config: StudyConfig, log=print, runner: TrialRunner | None = None):
        self.config, self.log = config, log
        trainer = config.trainer
        data = load_dataset(trainer.data, "train")  # header only for latent shards
        model_config = base_model(trainer, data.shape, data.num_classes).config
        self.model_config = model_config
        self.space = SearchSpace(config.search_space, model_config.base_patch, model_config.input_size,
                                 trainer.eval.guidance)
        self.sampler_config = SamplerConfig(steps=trainer.eval.steps, solver=trainer.eval.solver,
                                            guidance=trainer.eval.guidance)
        most = max(config.search_space.stage_counts)
        if trainer.eval.steps < most:
            raise ConfigError(f"trainer.eval.steps is {trainer.eval.steps}, fewer than the {most} stages a schedule "
                              f"may have (each stage needs a solver step)")
        trainer.eval.fid.check()  # a missing Inception file fails now, not in every worker
        self.runner = runner or RayRunner(config)
        self.store = Store(config.storage)
        self.study = optuna.create_study(
            study_name=config.name, storage=config.storage, directions=["minimize", "minimize"],
            sampler=make_sampler(config.sampler, config.seed, self.space), load_if_exists=True)
        # Seeded by the trials so far: a resumed study must not replay its earlier launches' proposals.
        self.study.sampler = make_sampler(config.sampler, config.seed + len(self.study.get_trials(deepcopy=False)),
                                          self.space)
        self.study.set_metric_names(["gmacs", "fid"])
        self._check_settings()

    # -- study bookkeeping -----------------------------------------------------------
    def _check_settings(self):
        stored = self.study.user_attrs.get(CONFIG_ATTR)
        current = json.loads(json.dumps(asdict(self.config)))
        current["storage"] = hidden_password(self.config.storage)  # the database keeps no password
        if stored:
            changed = [k for k in _FIXED if stored.get(k) != current[k]]
            if changed:
                raise ConfigError(f"study {self.config.name!r} was run with other {' and '.join(changed)} settings; "
                                  f"resume it with the same ones or start a new study name")
        self.study.set_user_attr(CONFIG_ATTR, current)

    def _counted(self) -> int:
        """Trials that spent the budget: trained, finished or failed on their own."""
        return sum(1 for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("counted"))

    def _recover(self):
        """Fail the trials a dead driver left RUNNING and queue their schedules again."""
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study._storage.set_trial_user_attr(trial._trial_id, "error", "interrupted: the driver stopped")
            self.study.tell(trial.number, state=TrialState.FAIL)
            self.study.enqueue_trial(trial.params, user_attrs={"baseline": trial.user_attrs.get("baseline"),
                                                               "retry_of": trial.number})
            self._save(trial.number, trial._trial_id, trial.user_attrs.get("schedule", "?"), "FAIL",
                       trial.user_attrs.get("baseline"), error="interrupted: the driver stopped; re-queued")
            self.log(f"trial {trial.number} was left running by a stopped driver: failed, schedule re-queued")

    def _enqueue_baselines(self):
        if self.study.user_attrs.get("baselines_enqueued") or not self.config.baselines:
            return
        for name, schedule in baselines(self.model_config.base_patch).items():
            params = self.space.params(schedule)
            if params is None:
                self.log(f"baseline {name} ({schedule}) is outside the search space; skipped")
                continue
            self.study.enqueue_trial(params, user_attrs={"baseline": name})
        self.study.set_user_attr("baselines_enqueued", True)

    def _save(self, number, trial_id, schedule, state, baseline, result=None, error=None, gmacs=None, **extra):
        result = result or {}
        self.store.save(TrialRecord(
            study_name=self.config.name, trial_number=number, trial_id=trial_id, schedule=str(schedule),
            state=state, baseline=baseline, gmacs=result.get("gmacs", gmacs),
            relative_gmacs=result.get("relative_gmacs"), fid=result.get("fid"), fid_std=result.get("fid_std"),
            fid_details=result.get("fid_details", {}), timings=result.get("timings", {}),
            checkpoint=result.get("checkpoint"), error=error, worker=result.get("worker"), **extra))

    # -- proposals -------------------------------------------------------------------
    def _ask(self) -> Proposal:
        trial = self.study.ask()
        schedule = self.space.suggest(trial)
        trial.set_user_attr("schedule", str(schedule))
        gmacs = sample_cost(self.model_config, schedule, self.sampler_config).gmacs
        trial.set_user_attr("gmacs", gmacs)
        return Proposal(trial, schedule, trial.user_attrs.get("baseline"))

    def _over_budget(self, proposal: Proposal) -> bool:
        gmacs = proposal.trial.user_attrs["gmacs"]
        if self.config.max_gmacs is None or gmacs <= self.config.max_gmacs:
            return False
        proposal.trial.set_user_attr("error", f"over the GMACs budget ({gmacs:.4g} > {self.config.max_gmacs:.4g})")
        self.study.tell(proposal.trial, state=TrialState.PRUNED)
        return True

    def _tell_repeat(self, proposal: Proposal, original: optuna.trial.FrozenTrial):
        """A schedule evaluated before: its numbers again, no training."""
        proposal.trial.set_user_attr("duplicate_of", original.number)
        self.study.tell(proposal.trial, original.values)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> dict:
        self._recover()
        self._enqueue_baselines()
        slots = self.runner.start()
        budget = self.config.n_trials
        pending: dict = {}  # runner handle -> (proposal, started)
        waiting: dict[str, list[Proposal]] = {}  # repeats of a running schedule
        durations, idle, last_log = [], 0, 0.0  # idle: proposals in a row that added nothing
        started = time.perf_counter()
        # Kept up to date here rather than read from the study at each step: a study scan costs
        # O(trials), and this loop would run several per trial.
        trials = self.study.get_trials(deepcopy=False)
        counted = sum(1 for t in trials if t.user_attrs.get("counted"))
        done = {t.user_attrs["schedule"]: t for t in trials
                if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs}
        # A grid is finite: the search stops asking once every grid point has been proposed.
        grid = isinstance(self.study.sampler, optuna.samplers.GridSampler)
        grid_left = (math.prod(len(v) for v in self.space.grid_search_space().values())
                     - sum(1 for t in trials if "grid_id" in t.system_attrs)) if grid else math.inf
        try:
            while True:
                running = {str(p.schedule) for p, _ in pending.values()}
                while (len(pending) < slots and counted + len(pending) < budget and grid_left > 0
                       and (grid or idle < _MAX_IDLE_PROPOSALS)):
                    proposal = self._ask()
                    text = str(proposal.schedule)
                    idle += 1
                    if grid and "grid_id" in self.study._storage.get_trial_system_attrs(proposal.trial._trial_id):
                        grid_left -= 1
                    if text in done:
                        self._tell_repeat(proposal, done[text])
                    elif text in running:
                        waiting.setdefault(text, []).append(proposal)
                    elif not self._over_budget(proposal):
                        idle = 0
                        out_dir = Path(self.config.checkpoint_dir) / self.config.name / f"trial_{proposal.trial.number}"
                        handle = self.runner.submit(self.config.trainer, text, str(out_dir))
                        pending[handle] = (proposal, time.perf_counter())
                        running.add(text)
                        self._save(proposal.trial.number, proposal.trial._trial_id, text, "RUNNING",
                                   proposal.baseline, gmacs=proposal.trial.user_attrs["gmacs"])
                if not pending:
                    break
                for handle in self.runner.wait(list(pending), timeout=10.0):
                    proposal, t0 = pending.pop(handle)
                    durations.append(time.perf_counter() - t0)
                    counted += 1
                    finished = self._finish(proposal, handle, waiting.pop(str(proposal.schedule), []))
                    if finished:
                        done[str(proposal.schedule)] = finished
                if time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    self._progress(len(pending), durations, slots, budget)
        finally:
            self.runner.close()
        if grid_left == 0:
            self.log("the grid is spent: every one of its points was proposed")
        elif not grid and idle >= _MAX_IDLE_PROPOSALS:
            self.log(f"the search space is spent: {_MAX_IDLE_PROPOSALS} proposals in a row added no new schedule")
        return {"trials": self._counted(), "seconds": time.perf_counter() - started,
                "front": self.store.update_front(self.config.name)}

    def _finish(self, proposal: Proposal, handle, repeats: list[Proposal]) -> optuna.trial.FrozenTrial | None:
        """Tell the trial's result (and its repeats'); the finished trial when COMPLETE."""
        trial, text = proposal.trial, str(proposal.schedule)
        trial.set_user_attr("counted", True)
        try:
            result = self.runner.result(handle)
        except Exception as err:  # the trial's own error, or its worker's death after the retries
            message = _error_line(err)
            trial.set_user_attr("error", message)
            # ppsearch's row first: a driver killed in between leaves an Optuna RUNNING trial,
            # which the next launch recovers; the other order could leave a RUNNING row for ever.
            self._save(trial.number, trial._trial_id, text, "FAIL", proposal.baseline,
                       gmacs=trial.user_attrs["gmacs"], error=message)
            self.study.tell(trial, state=TrialState.FAIL)
            self.log(f"trial {trial.number} {text} failed: {message}")
            for repeat in repeats:  # they would fail alike; their proposals count for nothing
                repeat.trial.set_user_attr("error", f"repeat of trial {trial.number}, which failed: {message}")
                self.study.tell(repeat.trial, state=TrialState.FAIL)
            return None
        for key in ("fid_std", "checkpoint", "timings"):
            trial.set_user_attr(key, result[key])
        self._save(trial.number, trial._trial_id, text, "COMPLETE", proposal.baseline, result)
        self.study.tell(trial, [result["gmacs"], result["fid"]])
        front = self.store.update_front(self.config.name)
        self.log(f"trial {trial.number} {text}{f' ({proposal.baseline})' if proposal.baseline else ''}: "
                 f"FID {result['fid']:.2f} +- {result['fid_std']:.2f}, {result['gmacs']:.4g} GMACs "
                 f"({100 * result['relative_gmacs']:.0f}% of the base), {result['timings']['total']:.0f} s"
                 f"{' [front]' if trial.number in front else ''}")
        original = self.study._storage.get_trial(trial._trial_id)
        for repeat in repeats:
            self._tell_repeat(repeat, original)
        return original

    def _progress(self, running: int, durations: list[float], slots: int, budget: int):
        trials = self.study.get_trials(deepcopy=False)
        complete = sum(1 for t in trials if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs)
        failed = sum(1 for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("counted"))
        left = budget - self._counted() - running
        eta = (left + running / 2) * (sum(durations) / len(durations)) / max(1, slots) if durations else float("nan")
        best = self.store.front(self.config.name)
        front = ", ".join(f"{r.schedule} {r.fid:.1f}" for r in best.itertuples()) if len(best) else "-"
        self.log(f"[{self.config.name}] {complete} done, {running} running, {failed} failed of {budget} | "
                 f"front: {front} | ETA {'?' if math.isnan(eta) else f'{eta / 60:.1f} min'}")


def _trial_function(path: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"trial_function {path!r} is not an importable module:function") from None


class TrialRunner(Protocol):
    """Where the driver's trials run: ``start`` says how many at once, ``submit`` starts one
    (``trial_function(trainer, schedule, out_dir)``) and returns a handle, ``wait`` gives the
    handles that finished (at least one unless ``timeout`` seconds pass), ``result`` returns a
    finished trial's result or raises its error, ``close`` lets go of the resources."""

    def start(self) -> int: ...
    def submit(self, trainer, schedule: str, out_dir: str): ...
    def wait(self, handles: list, timeout: float) -> list: ...
    def result(self, handle) -> dict: ...
    def close(self): ...


class RayRunner:
    """Trials as Ray tasks on a cluster (``ray.address``) or on a local one started here."""

    def __init__(self, config: StudyConfig):
        self.config, self.function = config, _trial_function(config.trial_function)

    def start(self) -> int:
        import ray

        config = self.config
        self.address = config.ray.address or os.environ.get("RAY_ADDRESS")
        try:
            if self.address:
                ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"cannot reach Ray at {self.address}: {str(err).splitlines()[0]}") from None
        resources = ray.cluster_resources()
        need_cpu, need_gpu = config.ray.num_cpus_per_trial, config.ray.num_gpus_per_trial
        if need_gpu > resources.get("GPU", 0):
            self.close()
            raise ConfigError(f"ray.num_gpus_per_trial is {need_gpu:g} but the Ray cluster has "
                              f"{resources.get('GPU', 0):g} GPUs; set ray.num_gpus_per_trial=0 to run on CPUs")
        slots = int(resources.get("CPU", 1) // need_cpu) if need_cpu else 1
        if need_gpu:
            slots = min(slots, int(resources["GPU"] // need_gpu))
        # max_calls=0 keeps GPU workers alive between trials, so each loads the base once.
        self.remote = ray.remote(max_calls=0)(self.function).options(
            num_cpus=need_cpu, num_gpus=need_gpu, max_retries=config.ray.max_retries)
        return max(1, min(slots, config.ray.max_concurrent or slots))

    def submit(self, trainer, schedule, out_dir):
        return self.remote.remote(trainer, schedule, out_dir)

    def wait(self, handles, timeout):
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout)[0]

    def result(self, handle):
        import ray

        return ray.get(handle)

    def close(self):
        import ray

        if not self.address:
            ray.shutdown()


class InlineRunner:
    """Trials run in the driver's process when submitted, ``slots`` of them pending at a time
    and finishing in the order they were submitted: a deterministic study, for replaying a
    sampler against a table of known results (bench/search_efficiency.py) or for debugging."""

    def __init__(self, function, slots: int = 1):
        self.function, self.slots, self.outcomes, self.count = function, slots, {}, 0

    def start(self):
        return self.slots

    def submit(self, trainer, schedule, out_dir):
        self.count += 1
        try:
            self.outcomes[self.count] = (self.function(trainer, schedule, out_dir), None)
        except Exception as err:  # told as the trial's failure, as a Ray task's would be
            self.outcomes[self.count] = (None, err)
        return self.count

    def wait(self, handles, timeout):
        return [min(handles)]

    def result(self, handle):
        result, error = self.outcomes.pop(handle)
        if error is not None:
            raise error
        return result

    def close(self):
        pass
