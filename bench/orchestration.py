"""The search driver's own cost and robustness, with a stand-in trial body (bench/standin.py: it
sleeps, then returns the schedule's GMACs and a synthetic FID) on a local Ray cluster that
declares 8 logical GPUs. Four tables; the result line comes last.

1. overhead: driver milliseconds per trial beyond the trial itself, 1 ms trials (the least
   ``trainer.steps`` allows) one at a time, on SQLite and PostgreSQL, with the TPE and the random
   sampler; split over the first and the last trials of the run (the driver's work grows with
   the study) and over the driver methods it is spent in, each without the others it calls:
   propose (enqueue, ask, suggest, describe the trial), repeats (a proposal told PRUNED as a
   repeat), submit (hand the trial to Ray), collect (wait for Ray and fetch the result: Ray's
   share), tell, front (Optuna's ``best_trials``), attrs (a trial's user attributes), trial ids
   (Optuna's number -> id), fill (the loop over free slots, the GMACs budget), progress;
   "other" is the rest.
2. scaling: trials per second with 1, 2, 4, 8 concurrent trials of --sleep seconds on one
   logical GPU each; efficiency = throughput(k) / (k x throughput(1)).
3. full disk: ``ppsearch launch`` of a SQLite study whose file lives on a small tmpfs that is
   filled up (dd) mid-study for --full-seconds, then freed; the driver rides it out through its
   database retries or stops in one line, and is launched again until the study is done. Needs
   root (mount); skipped, saying why, where the tmpfs cannot be mounted.
4. soak: ``ppsearch launch`` of a PostgreSQL study whose URL holds a password, with about
   --kill-fraction of the trials' Ray workers SIGKILLed at random moments, and, one at a time at
   random points of the study: the driver's process group SIGKILLed (launched again once its
   lease is stale), the PostgreSQL server restarted (crash stop), a second ``ppsearch launch`` on
   the live study (it must be refused and change nothing), the driver SIGTERMed (exit 143, one
   line; launched again at once). Then the checks of table 3 and 4 (``study_checks``,
   ``Soak.checks``). The script exits 1 when a check fails.

The cluster is started here with bench/ on its PYTHONPATH, so its workers (and the launched
drivers) import the stand-in; the throwaway PostgreSQL server is tests/postgres.py's.

    python bench/orchestration.py            # about 20 minutes on a busy 2-core machine
    python bench/orchestration.py --quick    # CI: checks the script, every fault once, small studies
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import optuna
import ray
from optuna.trial import TrialState

from ppsearch import query
from ppsearch.config import load_study
from ppsearch.schedule import Schedule
from ppsearch.search import Driver
from ppsearch.store import engine_options, transient
from search_efficiency import non_dominated  # the front worked out apart from Optuna's best_trials
from standin import STEP_SECONDS, model_config, synthetic_fid

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent / "tests"))
from postgres import PASSWORD, postgres_server, restart_server  # noqa: E402  (the tests' throwaway server)

STANDIN = "standin:standin_trial"
GPUS = 8
# Driver methods the overhead is split over; a method's time leaves out the others it calls.
PARTS = {"propose": "_propose", "repeats": "_prune", "submit": "_submit", "collect": "_collect",
         "tell": "_complete", "front": "front_numbers", "attrs": "_set", "trial ids": "_trial_id", "fill": "_fill",
         "progress": "_progress"}
RESULTS = (TrialState.COMPLETE, TrialState.FAIL)
UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


@contextlib.contextmanager
def ray_cluster(gpus: int):
    """A local Ray cluster declaring ``gpus`` logical GPUs (and as many CPUs); yields its
    address. PYTHONPATH holds bench/ from here on, for its workers and for launched drivers."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=gpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def study_overrides(name, storage, workdir, address, *, sampler, n_trials, sleep, concurrent, retries=2,
                    lease_timeout=120.0):
    """``ppsearch launch`` overrides of a toy study whose trials are the stand-in's."""
    return [f"name={name}", f"storage={storage}", f"sampler={sampler}", f"n_trials={n_trials}",
            f"trial_function={STANDIN}", f"trainer.steps={max(1, round(sleep / STEP_SECONDS))}", f"ray.address={address}",
            "ray.num_gpus_per_trial=1", f"ray.max_concurrent={concurrent}", f"ray.max_retries={retries}",
            f"lease_timeout={lease_timeout:g}", f"checkpoint_dir={workdir / 'checkpoints'}",
            f"export_dir={workdir / 'exports'}", "warm_start.steps=0"]  # stand-in trials: nothing to warm-start


# -- 1 and 2: the driver in this process ---------------------------------------------------------

class PartTimer:
    """While ``patched()``: seconds the driver spends in each of PARTS, the duration of each
    proposal and the moment each trial was told COMPLETE."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.proposals, self.finished = [], []
        self._nested = []  # per open timed call: seconds spent in timed calls inside it

    def _timed(self, part, method):
        @functools.wraps(method)
        def timed(*args, **kwargs):
            self._nested.append(0.0)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[part] += end - start - self._nested.pop()
                if self._nested:
                    self._nested[-1] += end - start
                if part == "propose":
                    self.proposals.append(end - start)
                elif part == "tell":
                    self.finished.append(end)
        return timed

    @contextlib.contextmanager
    def patched(self):
        with contextlib.ExitStack() as stack:
            for part, name in PARTS.items():
                stack.enter_context(mock.patch.object(Driver, name, self._timed(part, getattr(Driver, name))))
            yield self


def run_driver(overrides, timer: PartTimer | None = None) -> float:
    """Wall seconds of ``Driver.run`` in this process (its set-up not counted), timed in parts
    by ``timer`` if given."""
    driver = Driver(load_study("toy", overrides), log=lambda line: None)
    with timer.patched() if timer else contextlib.nullcontext():
        start = time.perf_counter()
        driver.run()
        return time.perf_counter() - start


def overhead(storages, workdir, address, args) -> dict:
    """Table 1; returns ms per trial by (storage, sampler)."""
    n, window = args.overhead_trials, args.window
    print(f"\n1. driver overhead: {n} trials of 1 ms, one at a time. ms per trial: over all trials, the first "
          f"{window} and the last {window}; proposals per trial (repeats of a schedule are proposed too) and "
          f"ms per proposal, first and last {window}; ms per trial in each driver method")
    print(f"{'storage':<11} {'sampler':<7} {'all':>6} {'first':>6} {'last':>6} | {'props':>5} {'prop 1st':>8} "
          f"{'prop last':>9} | " + " ".join(f"{part:>9}" for part in PARTS) + f" {'other':>6}")
    per_trial = {}
    for sampler in args.samplers:
        for backend, url in storages.items():
            timer = PartTimer()
            wall = run_driver(study_overrides(f"overhead-{sampler}", url, workdir, address, sampler=sampler,
                                              n_trials=n, sleep=STEP_SECONDS, concurrent=1), timer)
            cycles = [b - a for a, b in zip(timer.finished, timer.finished[1:])]
            ms = {part: 1e3 * seconds / n for part, seconds in timer.seconds.items()}
            per_trial[backend, sampler] = 1e3 * wall / n
            first, last, propose_first, propose_last = (1e3 * statistics.mean(times) for times in (
                cycles[:window], cycles[-window:], timer.proposals[:window], timer.proposals[-window:]))
            print(f"{backend:<11} {sampler:<7} {1e3 * wall / n:>6.1f} {first:>6.1f} {last:>6.1f} | "
                  f"{len(timer.proposals) / n:>5.2f} {propose_first:>8.1f} {propose_last:>9.1f} | "
                  + " ".join(f"{ms[part]:>9.1f}" for part in PARTS) + f" {1e3 * wall / n - sum(ms.values()):>6.1f}")
    return per_trial


def scaling(url, workdir, address, args) -> dict[int, float]:
    """Table 2; returns the efficiency by number of concurrent trials."""
    sleep = args.sleep
    print(f"\n2. scaling: {args.trials_per_slot} trials per slot of {sleep:g} s each, one logical GPU each, "
          f"random sampler, {url.partition(':')[0]}, median of {args.repeats}")
    walls = {k: [] for k in args.concurrency}
    for repeat in range(args.repeats):  # interleaved, so drift hits every k alike
        for k in args.concurrency:
            walls[k].append(run_driver(study_overrides(f"scaling-{k}-{repeat}", url, workdir, address, sampler="random",
                                                       n_trials=args.trials_per_slot * k, sleep=sleep, concurrent=k)))
    print(f"{'concurrent':>10} {'trials':>6} {'wall s':>7} {'trials/s':>8} {'ideal':>7} {'efficiency':>10}")
    throughput = {k: args.trials_per_slot * k / statistics.median(walls[k]) for k in args.concurrency}
    base = throughput[args.concurrency[0]] / args.concurrency[0]
    efficiency = {k: throughput[k] / (k * base) for k in args.concurrency}
    for k in args.concurrency:
        print(f"{k:>10} {args.trials_per_slot * k:>6} {statistics.median(walls[k]):>7.2f} {throughput[k]:>8.2f} "
              f"{k * base:>7.2f} {efficiency[k]:>10.2f}")
    return efficiency


# -- 3 and 4: launched drivers and their faults --------------------------------------------------

def launch(overrides, log_path: Path, *, capture=False):
    """``ppsearch launch`` in its own session (a SIGKILL of its group takes nothing else), its
    output into ``log_path``; with ``capture``, run to its end and return the finished process."""
    command = [sys.executable, "-m", "ppsearch.cli", "launch", *overrides]
    if capture:
        return subprocess.run(command, capture_output=True, text=True, timeout=600)
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class Watch:
    """Reads a study while drivers write it, through Optuna's storage API. Returns None while
    the study is not made yet or the database does not answer (it is being restarted, say):
    the bench looks again a moment later, as any reader would."""

    def __init__(self, url: str, name: str):
        self.name = name
        self.storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_options(url))

    def trials(self, states=None) -> list[optuna.trial.FrozenTrial] | None:
        try:
            study_id = self.storage.get_study_id_from_name(self.name)
            return self.storage.get_all_trials(study_id, deepcopy=False, states=states)
        except KeyError:
            return None
        except Exception as err:  # noqa: BLE001 - a database blip is waited out, anything else raised
            if transient(err):
                return None
            raise

    def complete_values(self) -> dict[int, list[float]]:
        return {t.number: t.values for t in self.trials(states=(TrialState.COMPLETE,)) or []}

    def running_schedules(self) -> set[int]:
        """Trials RUNNING with a schedule: the ones a stopped driver left to resume."""
        return {t.number for t in self.trials(states=(TrialState.RUNNING,)) or [] if "schedule" in t.user_attrs}

    def close(self):
        self.storage.engine.dispose()


def study_checks(url, name, n_trials, base_patch, kept: dict[int, list[float]],
                 left_running: set[int]) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for a study its drivers have finished: read through Optuna and
    ``ppsearch.query``. ``kept``: trials COMPLETE (with their values) at some fault, which must
    still be; ``left_running``: trials a stopped driver left RUNNING, which must have finished
    under their own numbers."""
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    states = collections.Counter(t.state.name for t in trials)
    results = [t for t in trials if t.state in RESULTS]
    complete = [t for t in results if t.state == TrialState.COMPLETE]
    schedules = collections.Counter(t.user_attrs.get("schedule") for t in results)
    twice = sorted(s for s, k in schedules.items() if k > 1)
    lost = sorted(number for number, values in kept.items()
                  if by_number[number].state != TrialState.COMPLETE or by_number[number].values != values)
    # The base's replicate (another training seed) ends PRUNED with its FID as an attribute.
    finished = {t.number for t in trials if t.state in RESULTS or "replicate_fid" in t.user_attrs}
    not_resumed = sorted(number for number in left_running if number not in finished
                         or by_number[number].user_attrs.get("attempts", 1) < 2)
    unfinished = [t.number for t in trials if t.state in UNFINISHED]
    silent = [t.number for t in trials if (t.state == TrialState.FAIL and not t.user_attrs.get("error"))
              or (t.state == TrialState.PRUNED and not t.user_attrs.get("reason"))]
    scored = [(t, t.values[1] if t.state == TrialState.COMPLETE else t.user_attrs["replicate_fid"])
              for t in trials if t.number in finished and t.state != TrialState.FAIL]
    wrong = [t.number for t, fid in scored if fid != synthetic_fid(Schedule.parse(t.user_attrs["schedule"]), base_patch)]
    expected_front = sorted(complete[i].number for i in non_dominated(np.array([t.values for t in complete])))
    front = sorted(query.front(url, name).trial)
    table = query.trials(url, name)
    reasons = collections.Counter(r.partition(" of trial")[0].partition(":")[0].partition(" (")[0]
                                  for r in table[table.state == "PRUNED"].reason.fillna(""))
    attempts = collections.Counter(int(t.user_attrs.get("attempts", 1)) for t in results)
    return [
        ("results = trial budget", len(results) == n_trials and (table.state.isin(["COMPLETE", "FAIL"])).sum() == n_trials,
         f"{len(complete)} COMPLETE + {states['FAIL']} FAIL = {len(results)} of {n_trials}; attempts per result "
         + ", ".join(f"{k}: {v}" for k, v in sorted(attempts.items()))),
        ("no result lost or repeated", not twice and not lost,
         f"{len(schedules)} distinct schedules in {len(results)} results; {len(kept)} COMPLETE at a fault, "
         f"changed since: {lost or 'none'}; scored twice: {twice or 'none'}"),
        ("trials a stopped driver left RUNNING finished under their numbers", not not_resumed,
         f"{len(left_running)} left, not finished again: {not_resumed or 'none'}"),
        ("no trial RUNNING or WAITING", not unfinished, f"{unfinished or 'none'}"),
        ("every FAIL and PRUNED trial has a reason", not silent,
         f"{states['PRUNED']} PRUNED ({', '.join(f'{k} {r}' for r, k in reasons.most_common()) or 'none'}); "
         f"without: {silent or 'none'}"),
        ("each FID is its schedule's", not wrong, f"{len(scored)} FIDs (the base's replicate's too); "
                                                 f"wrong: {wrong or 'none'}"),
        ("ppsearch.query.front = brute-force front", front == expected_front,
         f"{len(front)} trials" + ("" if front == expected_front else f"; expected {expected_front}")),
    ]


@dataclass
class Ended:
    """One ``ppsearch launch`` and how it ended."""

    number: int
    log: Path
    code: int | None = None
    cause: str = "done"  # what the bench did to it: done (nothing), SIGKILL, SIGTERM

    def expected(self) -> bool:
        return self.code == {"done": 0, "SIGKILL": -signal.SIGKILL, "SIGTERM": 143}[self.cause]

    def tail(self, lines=12) -> str:
        return "\n".join(f"    {line}" for line in self.log.read_text().splitlines()[-lines:])


@dataclass
class Soak:
    """Table 4: one study, its launches, the faults put to it, and what each left behind."""

    url: str
    workdir: Path
    overrides: list[str]
    args: argparse.Namespace
    name: str = "soak"
    rng: random.Random = field(default_factory=random.Random)
    launches: list[Ended] = field(default_factory=list)
    process: subprocess.Popen | None = None
    kept: dict[int, list[float]] = field(default_factory=dict)  # COMPLETE at a fault, with values
    left_running: set[int] = field(default_factory=set)
    done: collections.Counter = field(default_factory=collections.Counter)  # faults by kind
    worker_kills: int = 0
    refusals: list[tuple[bool, str]] = field(default_factory=list)  # (as it must be, detail) per second driver
    sigterms: list[tuple[bool, str]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # of commands run to their end
    seconds: float = 0.0
    watch: Watch | None = None
    results_at_launch: int = 0  # a fault waits for the live launch's own first result
    missed: list[str] = field(default_factory=list)  # faults the study ended before

    def plan(self) -> list[tuple[int, str]]:
        """(results before it, fault), in order, at distinct numbers of results. Second drivers
        come in the first third, so that the live driver outlasts the second one's start; the
        rest anywhere between a tenth and four fifths of the budget, so that each meets a
        driver in the middle of the study."""
        n, args = self.args.soak_trials, self.args
        early = self.rng.sample(range(max(1, n // 10), max(args.second_drivers + 1, n // 3)), args.second_drivers)
        rest = [*["SIGKILL"] * args.driver_kills, *["database restart"] * args.db_restarts,
                *["SIGTERM"] * args.sigterms]
        late = self.rng.sample([k for k in range(max(1, n // 10), 4 * n // 5) if k not in early], len(rest))
        return sorted([*((at, "second driver") for at in early), *zip(late, self.rng.sample(rest, len(rest)))])

    def run(self):
        self.watch = Watch(self.url, self.name)  # makes Optuna's tables before any driver does
        plan, start = self.plan(), time.perf_counter()
        self._launch()
        while True:
            time.sleep(self.rng.uniform(0.1, 0.4))
            if time.perf_counter() - start > self.args.soak_timeout:
                os.killpg(self.process.pid, signal.SIGKILL)
                raise TimeoutError(f"the soak took over {self.args.soak_timeout} s ({self.done or 'no faults'} so "
                                   f"far); the last launch's output ends:\n{self.launches[-1].tail(30)}")
            if self.process.poll() is not None:
                if self._ended(self.process.returncode) == 0:
                    break
                time.sleep(self.args.lease_timeout)  # a launch that stopped unasked: as a user would, again
                self._launch()
                continue
            trials = self.watch.trials(states=(*RESULTS, TrialState.RUNNING))
            if trials is None:
                continue
            results = sum(t.state in RESULTS for t in trials)
            if plan and results >= plan[0][0] and results > self.results_at_launch:
                self._fault(plan.pop(0)[1])
            elif self.worker_kills < self.args.kill_fraction * len(trials):
                self._kill_a_worker()
        self.seconds = time.perf_counter() - start
        self.missed = [fault for _, fault in plan]
        self.watch.close()

    def _launch(self):
        self.launches.append(Ended(len(self.launches) + 1, self.workdir / f"soak-launch-{len(self.launches) + 1}.log"))
        self.process = launch(self.overrides, self.launches[-1].log)
        self.results_at_launch = self._results()

    def _ended(self, code: int, cause: str = "done") -> int:
        self.launches[-1].code, self.launches[-1].cause = code, cause
        return code

    def _results(self) -> int:
        while (trials := self.watch.trials(states=RESULTS)) is None and self.process.poll() is None:
            time.sleep(0.5)
        return len(trials or [])

    def _fault(self, kind: str):
        self.kept.update(self.watch.complete_values())
        {"SIGKILL": self._sigkill, "SIGTERM": self._sigterm, "database restart": self._restart_database,
         "second driver": self._second_driver}[kind]()
        self.done[kind] += 1

    def _kill_a_worker(self):
        if victims := _running_standins():
            with contextlib.suppress(ProcessLookupError):  # it finished and exited meanwhile
                os.kill(self.rng.choice(victims), signal.SIGKILL)
                self.worker_kills += 1

    def _sigkill(self):
        """The driver dies at once, its Ray connection with it; the next launch takes over its
        lease once stale and starts its RUNNING trials again."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self._ended(self.process.wait(), "SIGKILL")
        self.left_running |= self.watch.running_schedules()
        time.sleep(self.args.lease_timeout)
        self._launch()

    def _sigterm(self):
        """As a scheduler stops a job: the driver cancels its trials (left RUNNING, marked
        interrupted), says so in one line, exits 143, and the next launch follows at once."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self._ended(code, "SIGTERM")
        running = [t for t in self.watch.trials(states=(TrialState.RUNNING,)) or [] if "schedule" in t.user_attrs]
        self.left_running |= {t.number for t in running}
        text = self.launches[-1].log.read_text()
        lines = text.strip().splitlines()
        stops = [line for line in lines if "stopped by SIGTERM" in line]
        unmarked = [t.number for t in running if not t.user_attrs.get("interrupted", "").startswith("SIGTERM")]
        ok = (code == 143 and len(stops) == 1 and lines[-1] == stops[0] and "resume with: ppsearch launch" in stops[0]
              and "Traceback" not in text and not unmarked)
        self.sigterms.append((ok, f"exit {code}, {len(running)} trials left RUNNING (not marked interrupted: "
                                  f"{unmarked or 'none'}), last line: {lines[-1][:160] if lines else '-'}"))
        self._launch()

    def _restart_database(self):
        """The server stops as in a crash, for --restart-pause seconds; drivers retry their writes."""
        restart_server(self.url, pause=self.args.restart_pause)

    def _second_driver(self):
        """A second ``ppsearch launch`` on the live study: refused in one line (exit 2), and the
        lease, the study's unique id and its stored configuration stay the live driver's."""
        before, started = self._owner(), time.perf_counter()
        second = launch(self.overrides, None, capture=True)
        after, alive = self._owner(), self.process.poll() is None
        self.outputs.append(second.stdout + second.stderr)
        last = (second.stderr.strip().splitlines() or ["-"])[-1]
        ok = (second.returncode == 2 and "is being run by another driver" in last and "Traceback" not in second.stderr
              and alive and before == after and before[0] == self.process.pid)
        self.refusals.append((ok, f"exit {second.returncode} after {time.perf_counter() - started:.0f} s, lease and "
                                  f"identity {'unchanged' if before == after else f'{before} -> {after}'}, live driver "
                                  f"{'running' if alive else 'gone'}; {last[:160]}"))

    def _owner(self) -> tuple:
        """(pid, since) of the lease's holder, the study's unique id and stored configuration."""
        with query.open_study(self.url, self.name, retry_seconds=60) as view:
            lease = view.lease()
            return (lease and lease.pid, lease and lease.since, view.store.study_uid(view.study_id),
                    json.dumps(view.store.config(view.study_id), sort_keys=True))

    def checks(self, base_patch) -> list[tuple[str, bool, str]]:
        status = subprocess.run([sys.executable, "-m", "ppsearch.cli", "status", f"name={self.name}",
                                 f"storage={self.url}"], capture_output=True, text=True)
        logs = "\n".join(ended.log.read_text() for ended in self.launches)
        texts = {"launch outputs": logs, "second drivers' outputs": "\n".join(self.outputs),
                 "status output": status.stdout + status.stderr, "driver.log files": "\n".join(
                     p.read_text() for p in (self.workdir / "checkpoints").rglob("driver.log")),
                 "the study's records": self._records()}
        leaks = [where for where, text in texts.items() if PASSWORD in text]
        unexpected = [f"launch {e.number} ({e.cause}): exit {e.code}\n{e.tail()}" for e in self.launches
                      if not e.expected()]
        took_over = logs.count("took over the lease of a driver that stopped answering")
        retries = logs.count("database unreachable"), logs.count("database answers again")
        return [*study_checks(self.url, self.name, self.args.soak_trials, base_patch, self.kept, self.left_running),
                ("password in no output, log, error or record", not leaks, f"found in: {leaks or 'none'}"),
                ("every launch ended as it should", not unexpected,
                 f"{len(self.launches)} launches" + "".join(f"\n  {line}" for line in unexpected)),
                ("driver SIGKILLed mid-run, its lease taken over", self.done["SIGKILL"] == self.args.driver_kills
                 and took_over >= self.done["SIGKILL"], f"{self.done['SIGKILL']} of {self.args.driver_kills}; "
                                                        f"{took_over} stale leases taken over"),
                ("database restarted mid-run, ridden out", self.done["database restart"] == self.args.db_restarts,
                 f"{self.done['database restart']} of {self.args.db_restarts}; the drivers logged {retries[0]} "
                 f"'database unreachable' and {retries[1]} 'answers again'"),
                ("second driver refused, nothing changed", len(self.refusals) == self.args.second_drivers
                 and all(ok for ok, _ in self.refusals),
                 f"{len(self.refusals)} of {self.args.second_drivers}" + "".join(f"\n    {d}" for _, d in self.refusals)),
                ("SIGTERM: exit 143, one line, trials marked interrupted", len(self.sigterms) == self.args.sigterms
                 and all(ok for ok, _ in self.sigterms),
                 f"{len(self.sigterms)} of {self.args.sigterms}" + "".join(f"\n    {d}" for _, d in self.sigterms)),
                ("every fault met a live driver", not self.missed, f"missed: {self.missed or 'none'}"),
                ("ppsearch status exits 0", status.returncode == 0, status.stderr.strip()[-200:] or "yes")]

    def _records(self) -> str:
        """Everything the database holds about the study, as text: every trial's and the study's
        attributes, ppsearch's stored configuration."""
        with query.open_study(self.url, self.name) as view:
            trials = [{**t.user_attrs, **t.system_attrs} for t in view.study.get_trials(deepcopy=False)]
            return json.dumps([view.study.user_attrs, view.store.config(view.study_id), trials], default=str)


def _running_standins() -> list[int]:
    """Process ids of this process's descendants (its Ray cluster's workers) now running the
    stand-in, from /proc (Linux)."""
    parents, titles = {}, {}
    for folder in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):  # gone since the listing
            parents[int(folder.name)] = int((folder / "stat").read_text().rpartition(")")[2].split()[1])
            titles[int(folder.name)] = (folder / "cmdline").read_bytes().split(b"\0")[0]
    mine, found = {os.getpid()}, True
    while found:
        found = {pid for pid, parent in parents.items() if parent in mine} - mine
        mine |= found
    title = f"ray::{STANDIN.partition(':')[2]}".encode()
    return [pid for pid in mine if titles.get(pid) == title]


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int):
    """A tmpfs of ``megabytes`` at ``folder``; yields None, or why it could not be mounted."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "ppsearch-bench", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        yield f"cannot mount a {megabytes} MB tmpfs ({(mounted.stderr.strip() or 'mount failed').splitlines()[0]}; " \
              f"it needs root)"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


def full_disk(workdir, address, args) -> dict:
    """Table 3: a SQLite study on a tmpfs filled up mid-study, then freed; launched again for as
    long as a launch stops (a launch that stops must say why in one line)."""
    name, n, url = "full-disk", args.disk_trials, f"sqlite:///{workdir / 'disk' / 'study.db'}"
    overrides = study_overrides(name, url, workdir, address, sampler="random", n_trials=n, sleep=args.disk_sleep,
                                concurrent=args.disk_concurrent, lease_timeout=args.lease_timeout)
    with small_disk(workdir / "disk", args.disk_mb) as skipped:
        if skipped:
            return {"skipped": skipped}
        watch, start, launches, kept, filled = Watch(url, name), time.perf_counter(), [], {}, None
        while True:
            launches.append(Ended(len(launches) + 1, workdir / f"disk-launch-{len(launches) + 1}.log"))
            process = launch(overrides, launches[-1].log)
            while filled is None and process.poll() is None:
                time.sleep(0.2)
                if len(watch.trials(states=RESULTS) or []) >= n // 3:
                    kept = watch.complete_values()
                    filled = _fill_up(workdir / "disk", args.full_seconds)
            launches[-1].code = process.wait(args.soak_timeout)
            if launches[-1].code == 0 or len(launches) > 5 or time.perf_counter() - start > args.soak_timeout:
                break
            time.sleep(args.lease_timeout)  # its lease may be left behind (the disk was full)
        watch.close()
        base_patch = model_config(load_study("toy", overrides).trainer).base_patch
        checks = study_checks(url, name, n, base_patch, kept, set())
    logs = [ended.log.read_text() for ended in launches]
    stopped = [(text.strip().splitlines() or ["-"], text) for ended, text in zip(launches, logs) if ended.code != 0]
    one_line = all(lines[-1].startswith("ppsearch launch: error: ") and "Traceback" not in text for lines, text in stopped)
    # Optuna words a failed commit its own way; the driver's retry line says what it was doing.
    met = sum(text.count("database unreachable") for text in logs)
    outcome = "rode it out" if not stopped else f"stopped {len(stopped)} time(s), relaunched"
    checks += [("the disk filled up mid-study and a driver met it", bool(filled) and met > 0,
                f"{filled or 'never filled'}; the drivers logged 'database unreachable' {met} times"),
               ("the driver rode it out, or stopped in one line", one_line and launches[-1].code == 0,
                f"{outcome}: exits {[e.code for e in launches]}"
                + "".join(f"\n    {lines[-1][:200]}" for lines, _ in stopped))]
    return {"checks": checks, "outcome": outcome, "seconds": time.perf_counter() - start}


def _fill_up(folder: Path, seconds: float) -> str:
    """Fill the file system at ``folder`` to the last byte, keep it full ``seconds``, free it."""
    filler = folder / "filler"
    dd = subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, text=True)
    size = filler.stat().st_size
    time.sleep(seconds)
    filler.unlink()
    full = "No space left on device" in dd.stderr
    return f"full ({size / 2**20:.1f} MB of filler) for {seconds:g} s" if full else ""


def run(args):
    with tempfile.TemporaryDirectory(prefix="ppsearch-bench-") as tmp, postgres_server() as postgres, \
            ray_cluster(GPUS) as address:
        workdir = Path(tmp)
        storages = {"sqlite": f"sqlite:///{workdir / 'bench.db'}", "postgresql": postgres}
        print(f"{os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at start), Ray {ray.__version__} "
              f"cluster of {GPUS} logical GPUs, Optuna {optuna.__version__}, stand-in trials ({STANDIN})")
        most = max(args.concurrency)  # start that many workers: their imports are not the driver's cost
        run_driver(study_overrides("warm-up", postgres, workdir, address, sampler="random", n_trials=2 * most,
                                   sleep=args.sleep, concurrent=most))
        per_trial = overhead(storages, workdir, address, args)
        efficiency = scaling(postgres, workdir, address, args)
        disk = full_disk(workdir, address, args)
        print(f"\n3. full disk: {args.disk_trials} trials of {args.disk_sleep:g} s, {args.disk_concurrent} at once, "
              f"SQLite on a {args.disk_mb} MB tmpfs filled up after a third of them for {args.full_seconds:g} s"
              + (f": skipped, {disk['skipped']}" if "skipped" in disk else f"; {disk['seconds']:.0f} s"))
        report(disk.get("checks", []))
        overrides = study_overrides("soak", postgres, workdir, address, sampler="random", n_trials=args.soak_trials,
                                    sleep=args.soak_sleep, concurrent=args.soak_concurrent, retries=1,
                                    lease_timeout=args.lease_timeout)
        soak = Soak(postgres, workdir, overrides, args, rng=random.Random(args.seed))
        soak.run()
        checks = soak.checks(model_config(load_study("toy", overrides).trainer).base_patch)
    print(f"\n4. soak: {args.soak_trials} trials of {args.soak_sleep:g} s, {args.soak_concurrent} at once, random "
          f"sampler, PostgreSQL with a password, lease timeout {args.lease_timeout:g} s; {soak.worker_kills} trial "
          f"workers SIGKILLed, the driver SIGKILLed {soak.done['SIGKILL']} and SIGTERMed {soak.done['SIGTERM']} "
          f"times, the database restarted {soak.done['database restart']} times, {soak.done['second driver']} second "
          f"drivers; {len(soak.launches)} launches, {soak.seconds:.0f} s")
    report(checks)
    failed = [check for check, passed, _ in [*disk.get("checks", []), *checks] if not passed]
    if failed:
        print("the soak's last launch's output ends:\n" + soak.launches[-1].tail(15))
    k, sampler = max(k for k in args.concurrency if k <= 4), args.samplers[-1]
    sqlite, postgresql = per_trial["sqlite", sampler], per_trial["postgresql", sampler]
    disk_failed = [check for check, passed, _ in disk.get("checks", []) if not passed]
    soak_failed = [check for check, passed, _ in checks if not passed]
    print(f"result: scaling efficiency {efficiency[k]:.2f} at {k} concurrent trials (target 0.9), "
          f"{efficiency[args.concurrency[-1]]:.2f} at {args.concurrency[-1]}; driver overhead per trial "
          f"PostgreSQL / SQLite {postgresql / sqlite:.2f} ({postgresql:.0f} / {sqlite:.0f} ms, {sampler} sampler, "
          f"{args.overhead_trials} trials); full disk: "
          + ("skipped" if "skipped" in disk else f"FAILED {', '.join(disk_failed)}" if disk_failed else
             f"{disk['outcome']}, {len(disk['checks'])} checks passed")
          + "; soak: " + (f"FAILED {', '.join(soak_failed)}" if soak_failed else f"all {len(checks)} checks passed"))
    return 1 if failed else 0


def report(checks):
    for check, passed, detail in checks:
        print(f"  {'ok  ' if passed else 'FAIL'} {check}: {detail}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-trials", type=int, default=200)
    parser.add_argument("--window", type=int, default=25, help="trials in the first and last windows of table 1")
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--sleep", type=float, default=1.5, help="seconds per trial when measuring scaling")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials-per-slot", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--disk-trials", type=int, default=40)
    parser.add_argument("--disk-sleep", type=float, default=0.5)
    parser.add_argument("--disk-concurrent", type=int, default=4)
    parser.add_argument("--disk-mb", type=int, default=16, help="size of the full-disk run's tmpfs")
    parser.add_argument("--full-seconds", type=float, default=15, help="how long the disk stays full")
    parser.add_argument("--soak-trials", type=int, default=300)
    parser.add_argument("--soak-sleep", type=float, default=0.5)
    parser.add_argument("--soak-concurrent", type=int, default=GPUS)
    parser.add_argument("--kill-fraction", type=float, default=0.2, help="worker kills per dispatched trial")
    parser.add_argument("--driver-kills", type=int, default=2)
    parser.add_argument("--db-restarts", type=int, default=3)
    parser.add_argument("--restart-pause", type=float, default=1.0, help="seconds the database stays down")
    parser.add_argument("--second-drivers", type=int, default=2)
    parser.add_argument("--sigterms", type=int, default=2)
    parser.add_argument("--lease-timeout", type=float, default=5.0,
                        help="of the launched studies: a relaunch after a SIGKILL waits this long")
    parser.add_argument("--soak-timeout", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small settings: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.overhead_trials, args.window, args.sleep, args.concurrency, args.trials_per_slot = 6, 2, 0.1, [1, 2], 2
        # Trials long enough that the live driver outlasts a second one's start (20 s on a busy machine).
        args.repeats, args.soak_trials, args.soak_sleep, args.soak_concurrent, args.soak_timeout = 1, 20, 4.0, 2, 400
        args.driver_kills, args.db_restarts, args.second_drivers, args.sigterms = 1, 1, 1, 1
        args.disk_trials, args.disk_sleep, args.disk_concurrent, args.full_seconds = 9, 0.5, 2, 5
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
