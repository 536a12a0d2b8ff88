"""The search driver. One process per study holds the study's lease and owns the Optuna study
(ask / tell: the only writer); every trial runs on a runner (Ray tasks, ``ppsearch.runners``).

The Optuna study is the one record of every trial: its values (GMACs, FID) and, as user
attributes, its schedule, folder, timings, FID noise and details, loss history, attempts and
error. A proposal that repeats a schedule already scored (or running) is told PRUNED with
``repeat_of``, as Optuna's FAQ advises for duplicates, so it is never a second front point.

Killing the driver loses nothing: its trials stay RUNNING, and the next ``launch`` (once the
dead driver's lease is stale) starts them again under the same trial numbers, in the same
folders, keyed by the study's unique id and the schedule, where they resume their checkpoints
or return the result they had already written. The budget counts results (COMPLETE, or FAIL of
the trial's own error) under the study's current settings, never attempts.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import TrialState

from .config import ConfigError, StudyConfig
from .data import load_dataset
from .errors import PPSearchError
from .evaluate import reference_statistics
from .fidelity import front as front_trials, promotion, rung_trainer
from .flops import sample_cost
from .flow import SolverConfig
from .runners import InlineRunner, RayRunner, Shared, TrialRunner, WorkerLost
from .schedule import Schedule
from .space import SearchSpace, baselines
from .stopping import handle_stop_signals
from .store import Retry, Store, StoreError, config_json, engine_options, hidden_password, new_uid
from .train import base_model
from .warm_start import Mixture, run_warm_start, warm_trainer

__all__ = ["Driver", "InlineRunner", "RayRunner", "make_sampler", "paths_made_absolute", "trial_folder"]

# Settings that decide what a trial's numbers mean: a study cannot change them once one of its
# trials is COMPLETE (before that, a relaunch may correct them).
FIXED = ("search_space", "trainer", "warm_start", "halving")
_MAX_IDLE_PROPOSALS = 200  # proposals in a row that add no new schedule: the space is spent
optuna.logging.set_verbosity(optuna.logging.WARNING)  # ppsearch logs each trial itself
warnings.filterwarnings("ignore", category=ExperimentalWarning)  # TPE's group, metric names


class StudyFailed(PPSearchError):
    """Every trial of the study failed, for one reason."""


class Interrupted(Exception):
    """The driver was asked to stop (SIGINT, SIGTERM) and did; the study resumes on launch."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name


def make_sampler(name: str, seed: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for ``name``. TPE is multivariate with grouping, which models the
    conditional space (parameters that exist for some stage counts only) jointly. ``grid``
    proposes every distinct schedule of the space once, in a seeded random order: the driver
    enqueues them; the random sampler underneath is never consulted."""
    if name == "tpe":
        return optuna.samplers.TPESampler(multivariate=True, group=True, seed=seed, n_startup_trials=5)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)
    if name in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}: one of tpe, nsga2, random, gp, grid")


def trial_folder(checkpoint_dir: str, study_name: str, study_uid: str, schedule: str, seed: int | None = None,
                 rung: int | None = None) -> Path:
    """Where a trial's files live: keyed by the study's unique id and the schedule (and the
    training seed of a replicate, and the rung with successive halving), so a study never reads
    another's files and a trial started again finds its own."""
    slug = (schedule.replace(",", "_").replace(":", "-") + ("" if seed is None else f"-seed{seed}")
            + ("" if rung is None else f"-rung{rung}"))
    if len(slug) > 100 or not re.fullmatch(r"[A-Za-z0-9@._-]+", slug):
        slug = f"{re.sub(r'[^A-Za-z0-9@._-]+', '_', slug)[:80]}-{hashlib.sha256(slug.encode()).hexdigest()[:12]}"
    return Path(checkpoint_dir) / f"{study_name}-{study_uid[:8]}" / slug


def _absolute(path: str | None) -> str | None:
    return None if path in (None, "", "embedded") else str(Path(path).expanduser().resolve())


def paths_made_absolute(config: StudyConfig) -> StudyConfig:
    """Paths of the config made absolute on the driver, so every worker reads the same ones
    whatever its working folder (a SQLite storage's file included)."""
    trainer = config.trainer
    config.checkpoint_dir, config.export_dir = _absolute(config.checkpoint_dir), _absolute(config.export_dir)
    trainer.base = _absolute(trainer.base) if trainer.base not in (None, "embedded") else trainer.base
    trainer.data.path = _absolute(trainer.data.path)
    trainer.eval.vae, trainer.eval.reference_images = _absolute(trainer.eval.vae), _absolute(trainer.eval.reference_images)
    fid = trainer.eval.fid
    fid.feature_extractor_weights_path, fid.cache_dir = _absolute(fid.feature_extractor_weights_path), _absolute(fid.cache_dir)
    match = re.fullmatch(r"(sqlite(?:\+\w+)?:///)([^?]+)(\?.*)?", config.storage)
    if match and match[2] != ":memory:" and not match[2].startswith("/"):
        config.storage = f"{match[1]}{_absolute(match[2])}{match[3] or ''}"
    return config


def fixed_settings(data: dict) -> dict:
    """The FIXED part of a stored or current configuration (JSON form); a warm start or rungs
    left at their defaults (off) count as absent, so studies made before they existed keep theirs."""
    defaults = config_json(StudyConfig())
    return {k: data.get(k, defaults[k]) for k in FIXED if k in ("search_space", "trainer") or data.get(k, defaults[k])
            != defaults[k]}


def settings_key(config: StudyConfig) -> str:
    """A short hash of the settings that decide what a trial's numbers mean."""
    return hashlib.sha256(json.dumps(fixed_settings(config_json(config)), sort_keys=True).encode()).hexdigest()[:12]


def differences(old, new, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two JSON-like configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _error_line(err: BaseException) -> str:
    """One line for a failed trial: the original exception inside Ray's wrapper."""
    cause = getattr(err, "cause", None) or err
    if type(cause).__name__ == "TrialFailed":
        return str(cause)[:500]
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


@dataclass
class Running:
    """A trial on a runner."""

    number: int
    trial_id: int
    schedule: str
    baseline: str | None
    folder: str
    started: float
    attempts: int = 1
    replicate_of: int | None = None  # the base trained again with another seed: training noise
    rung: int = 0  # successive halving's fidelity (the top rung when it is off)


@dataclass
class Loop:
    """What the driver's loop keeps between steps."""

    slots: int
    shared: Shared
    running: dict[Any, Running] = field(default_factory=dict)  # runner handle -> trial
    done: dict[tuple[str, int], int] = field(default_factory=dict)  # (schedule, rung) -> the trial that scored it (or failed)
    counted: int = 0  # results under the current settings: COMPLETE, or FAIL of the trial's own error
    idle: int = 0  # proposals in a row that added nothing
    grid: list[Schedule] | None = None  # schedules the grid sampler has left to propose
    baselines_done: bool = False
    replicated: bool = False  # the base's replicate is proposed
    scored: set[tuple[str, int]] = field(default_factory=set)  # (schedule, rung) with a COMPLETE trial
    results: list[dict] = field(default_factory=list)  # per rung: schedule -> (trial, gmacs, fid), COMPLETE
    promoted: list[set] = field(default_factory=list)  # per rung: schedules sent to the next rung
    durations: list[float] = field(default_factory=list)
    stop: str | None = None  # the signal that asked the driver to stop
    last_progress: tuple = ()
    last_log: float = 0.0


class Heartbeat(threading.Thread):
    """Renews the driver's lease every quarter of its timeout, whatever the driver is doing
    (starting Ray, waiting for trials); ``check`` raises in the driver if the lease was lost."""

    def __init__(self, store: Store, study_id: int, holder: str, timeout: float, retry: Retry):
        super().__init__(daemon=True, name="ppsearch-lease")
        self.store, self.study_id, self.holder, self.retry = store, study_id, holder, retry
        self.interval, self.failure, self.stopped = min(10.0, timeout / 4), None, threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            try:
                self.retry(lambda: self.store.renew(self.study_id, self.holder), "renewing the lease")
            except StoreError as err:
                self.failure = err
                return

    def check(self):
        if self.failure is not None:
            raise self.failure

    def stop(self):
        self.stopped.set()


def _optuna_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at ``url``. Two drivers that open a new database at the same moment both
    create its schema, and the second's insert of alembic's version row fails (IntegrityError):
    that one opens the schema the first made."""
    from sqlalchemy.exc import IntegrityError

    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))
    except IntegrityError:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))


class Driver:
    """Runs (or resumes) one study to its trial budget."""

    def __init__(self, config: StudyConfig, log: Callable[[str], None] = print, runner: TrialRunner | None = None):
        self.config, self.console = paths_made_absolute(config), log
        trainer = config.trainer
        data = load_dataset(trainer.data, "train")  # header only for latent shards
        self.base = base_model(trainer, data.shape, data.num_classes)
        self.model_config = self.base.config
        self.space = SearchSpace(config.search_space, self.model_config.base_patch, self.model_config.input_size,
                                 trainer.eval.guidance)
        self.solver_config = SolverConfig(steps=trainer.eval.steps, solver=trainer.eval.solver,
                                            guidance=trainer.eval.guidance)
        most = max(config.search_space.stage_counts)
        if trainer.eval.steps < most:
            raise ConfigError(f"trainer.eval.steps is {trainer.eval.steps}, fewer than the {most} stages a schedule "
                              f"may have (each stage needs a solver step)")
        if trainer.eval.fid.num_splits > 1 and trainer.eval.num_samples < 2 * trainer.eval.fid.num_splits:
            raise ConfigError(f"trainer.eval.num_samples is {trainer.eval.num_samples}; FID's noise estimate over "
                              f"{trainer.eval.fid.num_splits} splits needs at least {2 * trainer.eval.fid.num_splits}")
        trainer.eval.fid.check()  # a missing Inception file fails now, not in every worker
        self._check_export_dir()
        self.top = config.halving.rungs - 1  # the trainer's own fidelity
        self.warm = None  # the warm start's weights and checkpoint, once trained (warm_start.steps)
        self.runner = runner or RayRunner(config, log)
        self.retry = Retry(config.storage, config.database_retry_seconds, log)
        self.store = self.retry(lambda: Store(config.storage), "opening the study database")
        self.storage = self.retry(lambda: _optuna_storage(config.storage), "opening Optuna's storage")
        self.study = self.retry(lambda: optuna.create_study(
            study_name=config.name, storage=self.storage, directions=["minimize", "minimize"], load_if_exists=True),
            "creating the study")
        self.study_id = self.storage.get_study_id_from_name(config.name)
        self.holder, self.stop_signal, self.handle_signals = uuid.uuid4().hex, None, False
        stale = self.retry(lambda: self.store.acquire(self.study_id, config.name, self.holder, config.lease_timeout),
                           "taking the study's lease")
        if stale:
            log(f"took over the lease of a driver that stopped answering ({stale.describe()})")
        self.heartbeat = Heartbeat(self.store, self.study_id, self.holder, config.lease_timeout,
                                   Retry(config.storage, config.database_retry_seconds, log))
        self.heartbeat.start()
        try:
            self._identify()
        except BaseException:
            self._release()
            raise

    # -- identity and settings ---------------------------------------------------------------------
    def _identify(self):
        """The study's unique id (new for a new study, even one reusing a name) and its settings,
        checked against those it was run with."""
        config, study = self.config, self.study
        self.uid = study.user_attrs.get("ppsearch_uid")
        stored = self.store.config(self.study_id) if self.uid == self.store.study_uid(self.study_id) else None
        current = config_json(config)
        current["storage"] = hidden_password(config.storage)  # the database keeps no password
        if self.uid is None:
            self.uid = new_uid()
            self.retry(lambda: study.set_user_attr("ppsearch_uid", self.uid), "naming the study")
        if stored:
            old, new = fixed_settings(stored), fixed_settings(current)
            changed = [line for key in FIXED for line in differences(old.get(key), new.get(key), f"{key}.")]
            if changed and self._has_complete():
                raise ConfigError(f"study {config.name!r} was run with other settings ({'; '.join(changed)}); "
                                  f"resume it with the same ones or start a new study name")
            if changed:
                self.log(f"study {config.name!r} has no COMPLETE trial yet: its settings are replaced "
                         f"({'; '.join(changed)})")
        self.settings = settings_key(config)
        self.log_path = trial_folder(config.checkpoint_dir, config.name, self.uid, "x").parent / "driver.log"
        self.retry(lambda: self.store.set_identity(self.study_id, self.uid, current), "storing the settings")
        self.retry(lambda: study.set_metric_names(["gmacs", "fid"]), "naming the objectives")
        # Seeded by the trials so far: a resumed study must not replay its earlier launches' proposals.
        trials = self._trials()
        self.study.sampler = make_sampler(config.sampler, config.seed + len(trials), self.space)

    def log(self, line: str) -> None:
        self.console(line)
        if hasattr(self, "log_path"):
            self._to_log_file([line])

    def _has_complete(self) -> bool:
        return any(t.state == TrialState.COMPLETE for t in self._trials())

    def _check_export_dir(self):
        folder = Path(self.config.export_dir)
        existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ConfigError(f"export_dir {folder} cannot be made: {existing} is a file")
        probe = existing or Path.cwd()
        import os

        if not os.access(probe, os.W_OK):
            raise ConfigError(f"export_dir {folder} is not writable ({probe})")

    def _trials(self, states=None) -> list[optuna.trial.FrozenTrial]:
        return self.retry(lambda: self.study.get_trials(deepcopy=False, states=states), "reading the trials")

    def _ours(self, trial) -> bool:
        """Whether a trial ran under the study's current settings."""
        return trial.user_attrs.get("settings") == self.settings

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.perf_counter()
        try:
            loop = self._start()
            while True:
                loop.stop = self.stop_signal
                self.heartbeat.check()
                if not loop.stop:
                    self._fill(loop)
                if not loop.running:
                    break
                self._collect(loop, timeout=5.0)
                self._check_timeouts(loop)
                self._progress(loop)
                if loop.stop and self.config.on_interrupt == "cancel":
                    self._cancel_all(loop)
                    break
            self._finish_run(loop)
        finally:
            self.runner.close()
            self._release()
        return {"trials": loop.counted, "seconds": time.perf_counter() - started, "front": self.front_numbers()}

    def request_stop(self, signal_name: str) -> None:
        """Stop asking for trials; running ones are cancelled or finish (``on_interrupt``)."""
        self.stop_signal = signal_name

    def _start(self) -> Loop:
        slots = self.runner.start()
        if self.handle_signals:  # again: Ray puts its own handlers in place when it starts
            install_signal_handlers(self)
        trainer = self.config.trainer
        params = sum(p.numel() for p in self.base.parameters())
        need = params * 4 * (2 if not trainer.keep_train_state else 5)  # EMA (+ model, 2 AdamW moments)
        problem = self.runner.probe(trainer, self.config.checkpoint_dir, need)
        if problem:
            raise ConfigError(f"a worker cannot run trials: {problem}")
        reference = reference_statistics(trainer.eval, trainer.data)
        base = self._warm_start(self.runner.share({"base": self.base})) if self.config.warm_start.steps else self.base
        loop = Loop(slots=slots, shared=self.runner.share({"base": base, "reference": reference}),
                    results=[{} for _ in range(self.top + 1)], promoted=[set() for _ in range(self.top + 1)])
        trials = self._trials()
        for t in trials:
            if not self._ours(t):
                continue
            text, rung = t.user_attrs.get("schedule"), t.user_attrs.get("rung", self.top)
            if "replicate_of" in t.user_attrs:
                loop.replicated = True
                continue
            if "promoted_from" in t.user_attrs:
                loop.promoted[rung - 1].add(text)
            if t.state in (TrialState.COMPLETE, TrialState.FAIL):
                loop.done.setdefault((text, rung), t.number)
                loop.counted += 1
                if t.state == TrialState.COMPLETE:
                    loop.scored.add((text, rung))
                    loop.results[rung][text] = (t.number, *t.values)
        if self.config.sampler == "grid":
            order = self.space.schedules()
            import random

            random.Random(self.config.seed).shuffle(order)
            tried = {t.user_attrs.get("schedule") for t in trials if self._ours(t)}
            loop.grid = [s for s in order if str(s) not in tried]
        for t in trials:  # left RUNNING by a driver that stopped: start them again, same numbers
            if t.state == TrialState.RUNNING:
                self._resume(loop, t)
        return loop

    def _warm_start(self, shared: Shared):
        """The study's warm start (trained on a worker, or read back from its folder there): one
        variant with every patch shape the space allows, fine-tuned over the whole time axis."""
        config, mixture = self.config, str(Mixture.of_space(self.space))
        folder = str(trial_folder(config.checkpoint_dir, config.name, self.uid, f"warm-start-{config.warm_start.steps}"))
        trainer = warm_trainer(config.trainer, config.warm_start.steps)
        self.log(f"warm start: {config.warm_start.steps} steps of {mixture} (once per study), in {folder}; every trial "
                 f"then fine-tunes {config.warm_start.trial_steps or config.trainer.steps} steps from it "
                 f"(warm_start.trial_steps; trainer.steps={config.trainer.steps} is a trial's length from the base)")
        handle = self.runner.submit(trainer, mixture, folder, shared, function=run_warm_start)
        while not self.runner.wait([handle], timeout=5.0):
            self.heartbeat.check()
            if self.stop_signal:
                self.runner.cancel(handle, force=False)  # it saves a checkpoint, then stops
                self.runner.wait([handle], timeout=30.0)
                raise Interrupted(self.stop_signal, f"stopped by {self.stop_signal} during the warm start (it "
                                                    f"resumes from its checkpoint on launch)")
        try:
            result = self.runner.result(handle)
        except Exception as err:
            raise StudyFailed(f"the warm start failed: {_error_line(err)}") from None
        self.warm = result["checkpoint"]
        record = {k: result[k] for k in ("checkpoint", "final_loss", "seconds", "steps", "train_gmacs")}
        self.retry(lambda: self.study.set_user_attr("warm_start", {**record, "mixture": mixture}),
                   "recording the warm start")
        self.log(f"warm start ready (loss {result['final_loss']:.4f}, {result['seconds']:.0f} s)")
        return result["model"]

    def _trainer(self, rung: int, replicate: bool, init_from: str | None = None):
        """A trial's training settings: from the warm start if there is one, at its rung."""
        trainer = self.config.trainer
        if self.warm is not None:
            trainer = replace(trainer, base=self.warm, steps=self.config.warm_start.trial_steps or trainer.steps)
        if replicate:
            trainer = replace(trainer, seed=trainer.seed + 1)
        return replace(rung_trainer(trainer, self.config.halving, rung), init_from=init_from)

    def _resume(self, loop: Loop, trial):
        text, rung = trial.user_attrs.get("schedule"), trial.user_attrs.get("rung", self.top)
        key = (text, rung)
        if text is None or not self._ours(trial) or (key in loop.done and "replicate_of" not in trial.user_attrs):
            reason = ("a proposal the driver left unfinished" if text is None else
                      f"repeat of trial {loop.done[key]}" if key in loop.done else "made under other settings")
            self._prune(trial.number, reason)
            return
        self.log(f"trial {trial.number} {text} was left running by a stopped driver: starting it again")
        attempts = int(trial.user_attrs.get("attempts", 1)) + 1
        self._submit(loop, trial.number, text, trial.user_attrs.get("baseline"), attempts,
                     trial.user_attrs.get("replicate_of"), rung)

    # -- filling free slots --------------------------------------------------------------------------
    def _fill(self, loop: Loop):
        while (len(loop.running) < loop.slots and loop.counted + len(loop.running) < self.config.n_trials
               and loop.idle < _MAX_IDLE_PROPOSALS and loop.grid != [] and not self.stop_signal):
            if self._replicate_due(loop):
                self._replicate(loop)
                continue
            due = promotion(loop.results, loop.promoted, self.config.halving)
            if due is not None:
                self._promote(loop, *due)
                continue
            number, trial_id, schedule, baseline = self._propose(loop)
            key = (str(schedule), 0)
            loop.idle += 1
            running = {(r.schedule, r.rung): r.number for r in loop.running.values()}
            if key in loop.done or key in running:
                self._prune(number, f"repeat of trial {loop.done.get(key, running.get(key))}",
                            repeat_of=loop.done.get(key, running.get(key)))
            elif not self._within_gmacs_budget(number, trial_id):
                continue
            else:
                loop.idle = 0
                self._submit(loop, number, key[0], baseline, 1, rung=0)

    def _replicate_due(self, loop: Loop) -> bool:
        base = str(baselines(self.model_config.base_patch)["base"])
        return self.config.replicate_base and not loop.replicated and (base, self.top) in loop.scored

    def _replicate(self, loop: Loop):
        """The base trained once more with another seed, scored on the same noise and labels:
        the study's measure of training noise. Told PRUNED (never a second front point) with
        its FID in its record; it does not count against the budget."""
        base = baselines(self.model_config.base_patch)["base"]
        original = loop.done[(str(base), self.top)]
        self.retry(lambda: self.study.enqueue_trial(self.space.params(base), user_attrs={
            "replicate_of": original, "baseline": "base, seed + 1"}, skip_if_exists=False), "queueing a replicate")
        trial = self.retry(self.study.ask, "asking for a trial")
        self.space.suggest(trial)
        for key, value in {"schedule": str(base), "settings": self.settings, **self._rung_attrs(self.top)}.items():
            self.retry(lambda: trial.set_user_attr(key, value), "describing a trial")
        loop.replicated = True
        self._submit(loop, trial.number, str(base), "base, seed + 1", 1, original, self.top)

    def _promote(self, loop: Loop, text: str, source: int, rung: int):
        """Successive halving: ``text`` (trial ``source`` at the rung below) runs at ``rung``,
        from the lower rung's weights."""
        loop.promoted[rung - 1].add(text)
        source_attrs = self.retry(lambda: self.storage.get_trial_user_attrs(self._trial_id(source)), "reading a trial")
        attrs = {"promoted_from": source, "baseline": source_attrs.get("baseline")}
        number, _, _, baseline = self._propose(loop, (self.space.params(Schedule.parse(text)), attrs), rung)
        self.log(f"trial {number} {text}: promoted from trial {source} to rung {rung}")
        self._submit(loop, number, text, baseline, 1, rung=rung)

    def _rung_attrs(self, rung: int) -> dict:
        if not self.top:
            return {}
        trainer = self._trainer(rung, False)
        return {"rung": rung, "fidelity": {"steps": trainer.steps, "num_samples": trainer.eval.num_samples}}

    def _propose(self, loop: Loop, fixed: tuple | None = None, rung: int = 0):
        """Ask the study for a trial: ``fixed`` (parameters, attributes), else the next missing
        baseline or grid schedule (enqueued just before the ask, so no WAITING trial outlives the
        launch), else the sampler's choice; described at ``rung``."""
        fixed = fixed or self._next_fixed(loop)
        if fixed is not None:
            params, attrs = fixed
            self.retry(lambda: self.study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=False),
                       "queueing a schedule")
        trial = self.retry(self.study.ask, "asking for a trial")
        schedule = self.space.suggest(trial)
        text = str(schedule)
        cost = sample_cost(self.model_config, schedule, self.solver_config)
        base = sample_cost(self.model_config, Schedule.from_stages([self.model_config.base_patch]), self.solver_config)
        for key, value in {"schedule": text, "gmacs": cost.gmacs, "relative_gmacs": cost.macs / base.macs,
                           "settings": self.settings, "folder": str(self._folder(text, None, rung)),
                           **self._rung_attrs(rung)}.items():
            self.retry(lambda: trial.set_user_attr(key, value), "describing a trial")
        return trial.number, self._trial_id(trial.number), schedule, trial.user_attrs.get("baseline")

    def _folder(self, text: str, seed: int | None, rung: int) -> Path:
        return trial_folder(self.config.checkpoint_dir, self.config.name, self.uid, text, seed,
                            rung if self.top else None)

    def _next_fixed(self, loop: Loop):
        if loop.grid:
            return self.space.params(loop.grid.pop()), {}
        if not self.config.baselines or loop.baselines_done:
            return None
        tried = {t.user_attrs.get("schedule") for t in self._trials() if self._ours(t)}
        for name, schedule in baselines(self.model_config.base_patch).items():
            params = self.space.params(schedule)
            if str(schedule) not in tried and params is not None:
                return params, {"baseline": name}
        for name, schedule in baselines(self.model_config.base_patch).items():
            if self.space.params(schedule) is None:
                self.log(f"baseline {name} ({schedule}) is outside the search space; skipped")
        loop.baselines_done = True
        return None

    def _within_gmacs_budget(self, number: int, trial_id: int) -> bool:
        gmacs = self.storage.get_trial_user_attrs(trial_id)["gmacs"]
        if self.config.max_gmacs is None or gmacs <= self.config.max_gmacs:
            return True
        self._prune(number, f"over the GMACs budget ({gmacs:.4g} > {self.config.max_gmacs:.4g})")
        return False

    def _submit(self, loop: Loop, number: int, text: str, baseline: str | None, attempts: int,
                replicate_of: int | None = None, rung: int | None = None):
        rung = self.top if rung is None else rung
        below = str(self._folder(text, None, rung - 1)) if rung > 0 and replicate_of is None else None
        trainer = self._trainer(rung, replicate_of is not None, below)
        folder = self._folder(text, None if replicate_of is None else trainer.seed, rung)
        self._set(number, "attempts", attempts)
        handle = self.runner.submit(trainer, text, str(folder), loop.shared)
        loop.running[handle] = Running(number, self._trial_id(number), text, baseline, str(folder),
                                       time.perf_counter(), attempts, replicate_of, rung)

    # -- collecting finished trials ------------------------------------------------------------------
    def _collect(self, loop: Loop, timeout: float):
        for handle in self.runner.wait(list(loop.running), timeout=timeout):
            trial = loop.running.pop(handle)
            try:
                result = self.runner.result(handle)
            except WorkerLost as err:
                if trial.attempts <= self.config.ray.max_retries:
                    self.log(f"trial {trial.number} {trial.schedule}: its worker died ({err}); attempt "
                             f"{trial.attempts + 1} of {self.config.ray.max_retries + 1}")
                    self._submit(loop, trial.number, trial.schedule, trial.baseline, trial.attempts + 1,
                                 trial.replicate_of, trial.rung)
                    continue
                self._fail(loop, trial, f"{err} (after {trial.attempts} attempts)")
                continue
            except Exception as err:  # the trial's own error
                self._fail(loop, trial, _error_line(err), getattr(getattr(err, "cause", err), "log_tail", None))
                continue
            self._complete(loop, trial, result)

    def _complete(self, loop: Loop, trial: Running, result: dict):
        loop.durations.append(time.perf_counter() - trial.started)
        for key in ("fid_std", "fid_details", "timings", "compute", "checkpoint", "final_loss", "losses", "worker"):
            if key in result:
                self._set(trial.number, key, result[key])
        if trial.replicate_of is not None:
            self._set(trial.number, "replicate_fid", result["fid"])
            self._prune(trial.number, f"replicate of trial {trial.replicate_of} with another training seed "
                                      f"(the study's training noise)")
            self.log(f"trial {trial.number} {trial.schedule} trained again (seed + 1): FID {result['fid']:.2f} "
                     f"+- {result['fid_std'] or 0:.2f} (training noise)")
            return
        self.retry(lambda: self.study.tell(trial.number, [result["gmacs"], result["fid"]], skip_if_finished=True),
                   "telling a result")
        loop.done[(trial.schedule, trial.rung)] = trial.number
        loop.scored.add((trial.schedule, trial.rung))
        loop.results[trial.rung][trial.schedule] = (trial.number, result["gmacs"], result["fid"])
        loop.counted += 1
        front = self.front_numbers()
        if self.config.prune_off_front:
            self._prune_checkpoints(front)
        rung = f" [rung {trial.rung}]" if self.top else ""
        self.log(f"trial {trial.number} {trial.schedule}{f' ({trial.baseline})' if trial.baseline else ''}{rung}: "
                 f"FID {result['fid']:.2f} +- {result['fid_std'] or 0:.2f}, {result['gmacs']:.4g} GMACs "
                 f"({100 * result['relative_gmacs']:.0f}% of the base), {result['timings']['total']:.0f} s"
                 f"{' [front]' if trial.number in front else ''}")

    def _fail(self, loop: Loop, trial: Running, message: str, log_tail: list[str] | None = None):
        self._set(trial.number, "error", message)
        if log_tail:
            self._set(trial.number, "log_tail", log_tail)
            self._to_log_file([f"trial {trial.number} {trial.schedule} failed; its log ended:",
                               *(f"  {line}" for line in log_tail)])
        self.retry(lambda: self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True),
                   "telling a failure")
        if trial.replicate_of is None:
            loop.done[(trial.schedule, trial.rung)] = trial.number
            loop.counted += 1
        self.log(f"trial {trial.number} {trial.schedule} failed: {message}")

    def _check_timeouts(self, loop: Loop):
        limit = self.config.ray.trial_timeout
        if not limit:
            return
        for handle, trial in list(loop.running.items()):
            if time.perf_counter() - trial.started > limit:
                self.runner.cancel(handle, force=True)
                loop.running.pop(handle)
                self._fail(loop, trial, f"timed out after {limit:g} s (ray.trial_timeout)")

    def _cancel_all(self, loop: Loop):
        for handle, trial in loop.running.items():
            self.runner.cancel(handle, force=False)  # the trial saves a checkpoint, then stops
            self._set(trial.number, "interrupted", f"{loop.stop} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        deadline = time.monotonic() + 30  # time to write those checkpoints before Ray goes
        pending = list(loop.running)
        while pending and time.monotonic() < deadline:
            pending = [h for h in pending if h not in self.runner.wait(pending, timeout=1.0)]

    def _finish_run(self, loop: Loop):
        if loop.stop:
            left = len(loop.running)
            raise Interrupted(loop.stop, f"stopped by {loop.stop}: {left} running trial(s) cancelled (they resume "
                                         f"from their checkpoints)" if left else
                              f"stopped by {loop.stop} ({loop.counted} of {self.config.n_trials} results)")
        for t in self._trials(states=(TrialState.WAITING, TrialState.RUNNING)):
            self._prune(t.number, "not run: the search ended first")  # an unfinished proposal, never a ghost
        if loop.grid == []:
            self.log("the grid is spent: every schedule of the space was proposed")
        elif loop.idle >= _MAX_IDLE_PROPOSALS:
            self.log(f"the search space is spent: {_MAX_IDLE_PROPOSALS} proposals in a row added no new schedule")
        ours = [t for t in self._trials() if self._ours(t) and t.state in (TrialState.COMPLETE, TrialState.FAIL)
                and "replicate_of" not in t.user_attrs]
        if ours and all(t.state == TrialState.FAIL for t in ours):
            reasons = {t.user_attrs.get("error", "?") for t in ours}
            why = reasons.pop() if len(reasons) == 1 else f"{len(reasons)} different errors (ppsearch status lists them)"
            raise StudyFailed(f"all {len(ours)} trials of study {self.config.name!r} failed: {why}; correct the "
                              f"settings and launch again (a study with no COMPLETE trial takes new settings)")

    def _prune_checkpoints(self, front: list[int]):
        """Weights of COMPLETE trials off the front, deleted where this process sees them."""
        freed, trials = 0, self._trials()
        promoted = {t.user_attrs.get("promoted_from") for t in trials}
        for t in (t for t in trials if t.state == TrialState.COMPLETE):
            folder = t.user_attrs.get("checkpoint")
            if t.number in front or not folder or (t.user_attrs.get("rung", self.top) < self.top
                                                   and t.number not in promoted):
                continue  # a lower rung not promoted yet may still be: its weights are where that starts
            for name in ("model.safetensors", "train_state.pt"):
                path = Path(folder) / name
                if path.is_file():
                    freed += path.stat().st_size
                    path.unlink()
        if freed:
            self.log(f"deleted {freed / 2**30:.2f} GiB of weights of trials off the front (prune_off_front)")

    def _to_log_file(self, lines: list[str]):
        """The driver's log file, beside its trials' folders: what the console does not show."""
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write("".join(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n" for line in lines))
        except OSError:
            pass  # a convenience: the study's record holds the same lines

    # -- the study's records -------------------------------------------------------------------------
    def _trial_id(self, number: int) -> int:
        return self.retry(lambda: self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number),
                          "finding a trial")

    def _set(self, number: int, key: str, value):
        trial_id = self._trial_id(number)
        self.retry(lambda: self.storage.set_trial_user_attr(trial_id, key, value), f"recording a trial's {key}")

    def _prune(self, number: int, reason: str, repeat_of: int | None = None):
        self._set(number, "reason", reason)
        if repeat_of is not None:
            self._set(number, "repeat_of", repeat_of)
        self.retry(lambda: self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True), "pruning a trial")

    def front_numbers(self) -> list[int]:
        return sorted(t.number for t in self._front())

    def _front(self) -> list:
        """The front (Optuna's best trials; with rungs, among each schedule's highest rung)."""
        return front_trials(self._trials())

    # -- the lease and progress --------------------------------------------------------------------
    def _release(self):
        self.heartbeat.stop()
        try:
            Retry(self.config.storage, min(30.0, self.config.database_retry_seconds), self.log)(
                lambda: self.store.release(self.study_id, self.holder), "releasing the lease")
        except StoreError as err:
            self.log(f"could not release the lease ({err}); the next launch takes it over after "
                     f"{self.config.lease_timeout:g} s")

    def _progress(self, loop: Loop):
        now = time.perf_counter()
        if now - loop.last_log < 30:
            return
        loop.last_log = now
        budget = self.config.n_trials
        failed = sum(1 for t in self._trials(states=(TrialState.FAIL,)) if self._ours(t))
        complete = loop.counted - failed
        left = budget - loop.counted - len(loop.running)
        # Before the first result, the oldest running trial's age is a lower bound of a trial's time.
        oldest = max((now - r.started for r in loop.running.values()), default=0.0)
        mean = (sum(loop.durations) / len(loop.durations)) if loop.durations else oldest
        rounds = math.ceil(left / max(1, loop.slots)) + (1 if loop.running else 0)
        eta = f"{rounds * mean / 60:.1f} min" if loop.durations else f">= {rounds * mean / 60:.1f} min (no trial done yet)"
        best = self._front()
        front = ", ".join(f"{t.user_attrs['schedule']} {t.values[1]:.1f}" for t in sorted(best, key=lambda t: t.values[0])) or "-"
        state = (complete, len(loop.running), failed, front)
        if state == loop.last_progress:
            return
        loop.last_progress = state
        self.log(f"[{self.config.name}] {complete} done, {len(loop.running)} running, {failed} failed of {budget} | "
                 f"front: {front} | ETA {eta}")


def install_signal_handlers(driver: Driver) -> None:
    """First SIGINT / SIGTERM: the driver stops asking and winds down; a second one stops at once."""
    driver.handle_signals = True

    def first(name):
        driver.request_stop(name)
        driver.log(f"{name}: stopping ({'cancelling' if driver.config.on_interrupt == 'cancel' else 'finishing'} "
                   f"the running trials; {name} again to stop at once)")
    handle_stop_signals(first, lambda: bool(getattr(driver, "stop_signal", None)))
