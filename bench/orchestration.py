"""The search driver's own cost and robustness, with a stand-in trial body (bench/standin.py: it
sleeps, then returns the schedule's GMACs and a synthetic FID) on a local Ray cluster that
declares 8 logical GPUs. Three tables; the result line comes last.

1. overhead: driver milliseconds per trial beyond the trial itself (ask, dispatch, tell, front,
   database writes), 0 ms trials one at a time, on SQLite and PostgreSQL, with the TPE and the
   random sampler; split over the driver methods it is spent in (each without the others it
   calls), and over the first and the last trials of the run (the driver's work grows with
   the study).
2. scaling: trials per second with 1, 2, 4, 8 concurrent trials of --sleep seconds on one
   logical GPU each; efficiency = throughput(k) / (k x throughput(1)).
3. soak: ``ppsearch launch`` of a PostgreSQL study whose URL holds a password, with about
   --kill-fraction of the trials' Ray workers SIGKILLed at random moments and the driver's
   process group SIGKILLed twice and launched again; then ``soak_checks``. The script exits 1
   when a check fails.

The cluster is started here with bench/ on its PYTHONPATH, so its workers (and the launched
driver) import the stand-in; the throwaway PostgreSQL server is tests/postgres.py's.

    python bench/orchestration.py            # about 12 minutes on a busy 2-core machine
    python bench/orchestration.py --quick    # CI: checks the script, with a soak of 10 trials
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import optuna
import ray
from optuna.trial import TrialState

from ppsearch.config import load_study
from ppsearch.schedule import Schedule
from ppsearch.search import Driver
from ppsearch.store import Store, non_dominated
from standin import STEP_SECONDS, model_config, synthetic_fid

BENCH = Path(__file__).resolve().parent
sys.path.append(str(BENCH.parent / "tests"))
from postgres import PASSWORD, postgres_server  # noqa: E402  (the tests' throwaway server)

STANDIN = "standin:standin_trial"
GPUS = 8
# Driver methods the overhead is split over; a method's time leaves out the others it calls.
PARTS = {"ask": "_ask", "tell+front": "_finish", "db writes": "_save", "counting": "_counted",
         "progress": "_progress"}


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


def study_overrides(name, storage, workdir, address, *, sampler, n_trials, sleep, concurrent, retries=2):
    """``ppsearch launch`` overrides of a toy study whose trials are the stand-in's."""
    return [f"name={name}", f"storage={storage}", f"sampler={sampler}", f"n_trials={n_trials}",
            f"trial_function={STANDIN}", f"trainer.steps={round(sleep / STEP_SECONDS)}", f"ray.address={address}",
            "ray.num_gpus_per_trial=1", f"ray.max_concurrent={concurrent}", f"ray.max_retries={retries}",
            f"checkpoint_dir={workdir / 'checkpoints'}", f"export_dir={workdir / 'exports'}"]


class PartTimer:
    """While ``patched()``: seconds the driver spends in each of PARTS, the duration of each
    ask and the moment each trial finished."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.asks, self.finished = [], []
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
                if part == "ask":
                    self.asks.append(end - start)
                elif part == "tell+front":
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
    print(f"\n1. driver overhead: {n} trials of 0 ms, one at a time. ms per trial: over all trials, the first "
          f"{window} and the last {window}; proposals asked per trial (repeats of a schedule are asked too) and "
          f"ms per ask, first and last {window}; ms per trial in each driver method")
    print(f"{'storage':<11} {'sampler':<7} {'all':>6} {'first':>6} {'last':>6} | {'asks':>5} {'ask 1st':>7} "
          f"{'ask last':>8} | " + " ".join(f"{part:>10}" for part in PARTS) + f" {'ray+other':>10}")
    per_trial = {}
    for sampler in args.samplers:
        for backend, url in storages.items():
            timer = PartTimer()
            wall = run_driver(study_overrides(f"overhead-{sampler}", url, workdir, address, sampler=sampler,
                                              n_trials=n, sleep=0, concurrent=1), timer)
            cycles = [b - a for a, b in zip(timer.finished, timer.finished[1:])]
            ms = {part: 1e3 * seconds / n for part, seconds in timer.seconds.items()}
            per_trial[backend, sampler] = 1e3 * wall / n
            first, last, ask_first, ask_last = (1e3 * statistics.mean(times) for times in (
                cycles[:window], cycles[-window:], timer.asks[:window], timer.asks[-window:]))
            print(f"{backend:<11} {sampler:<7} {1e3 * wall / n:>6.1f} {first:>6.1f} {last:>6.1f} | "
                  f"{len(timer.asks) / n:>5.2f} {ask_first:>7.1f} {ask_last:>8.1f} | "
                  + " ".join(f"{ms[part]:>10.1f}" for part in PARTS) + f" {1e3 * wall / n - sum(ms.values()):>10.1f}")
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


def soak(url, workdir, address, args) -> dict:
    """Launch, kill and relaunch the driver while killing trial workers; table 3's numbers."""
    name, n = "soak", args.soak_trials
    overrides = study_overrides(name, url, workdir, address, sampler="random", n_trials=n, sleep=args.soak_sleep,
                                concurrent=args.soak_concurrent, retries=1)
    rng = random.Random(args.seed)
    driver_kills_at = sorted(rng.sample(range(n // 5, 4 * n // 5), 2))  # after so many COMPLETE trials
    store = Store(url)  # makes ppsearch's tables before any driver does
    log_path = workdir / "soak.log"
    worker_kills = driver_kills = 0
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        for kill_at in [*driver_kills_at, None]:
            process = subprocess.Popen([sys.executable, "-m", "ppsearch.cli", "launch", *overrides], stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
            while process.poll() is None:
                time.sleep(rng.uniform(0.05, 0.3))
                rows = store.trials(name)
                if kill_at is not None and (rows.state == "COMPLETE").sum() >= kill_at:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    driver_kills += 1
                elif worker_kills < args.kill_fraction * len(rows) and (victims := _running_standins()):
                    with contextlib.suppress(ProcessLookupError):  # it finished and exited meanwhile
                        os.kill(rng.choice(victims), signal.SIGKILL)
                        worker_kills += 1
                if time.perf_counter() - start > args.soak_timeout:
                    os.killpg(process.pid, signal.SIGKILL)
                    raise TimeoutError(f"the soak took over {args.soak_timeout} s; log: {log_path}")
            if process.returncode > 0:  # (killed ones return -9)
                raise RuntimeError(f"ppsearch launch exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
    seconds = time.perf_counter() - start
    status = subprocess.run([sys.executable, "-m", "ppsearch.cli", "status", f"name={name}", f"storage={url}"],
                            capture_output=True, text=True)
    base_patch = model_config(load_study("toy", overrides).trainer).base_patch
    log_text = log_path.read_text()
    checks = soak_checks(url, name, n, base_patch, texts={"driver log": log_text,
                                                          "status output": status.stdout + status.stderr})
    store.close()
    checks += [("ppsearch status exits 0", status.returncode == 0, status.stderr.strip()[-200:] or "yes"),
               ("driver killed mid-run twice", driver_kills == 2,
                f"{driver_kills}; {log_text.count('search space is spent')} launches stopped as the space seemed spent")]
    return {"seconds": seconds, "worker_kills": worker_kills, "driver_kills": driver_kills, "checks": checks,
            "log": log_text}


def soak_checks(url, name, n_trials, base_patch, texts: dict[str, str]) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for the soaked study."""
    with Store(url) as store:
        rows, front = store.trials(name), store.front(name)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    failed = rows[rows.state == "FAIL"]
    interrupted = failed.error.fillna("").str.contains("interrupted")
    # A trial that ran (or was cut off by a driver's death) must have a row; repeats of a
    # schedule told without running need none.
    ran = {t.number for t in trials if t.user_attrs.get("counted") or "interrupted" in t.user_attrs.get("error", "")}
    missing = sorted(ran - set(rows.trial))
    unmatched = [r.trial for r in rows.itertuples() if r.trial not in by_number
                 or by_number[r.trial]._trial_id != r.trial_id or by_number[r.trial].state.name != r.state
                 or (r.state == "COMPLETE" and by_number[r.trial].values != [r.gmacs, r.fid])]
    complete = rows[rows.state == "COMPLETE"]
    expected_front = sorted(complete.trial.iloc[non_dominated(list(zip(complete.gmacs, complete.fid)))])
    wrong = [r.trial for r in complete.itertuples() if r.fid != synthetic_fid(Schedule.parse(r.schedule), base_patch)]
    unfinished = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    silent = [t.number for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("error")]
    counted = sum(1 for t in trials if t.user_attrs.get("counted"))
    errors = "\n".join([*failed.error.fillna(""), *(t.user_attrs.get("error", "") for t in trials)])
    leaks = [where for where, text in {**texts, "trial errors": errors}.items() if PASSWORD in text]
    return [
        ("ppsearch rows COMPLETE or FAIL with a reason",
         set(rows.state) <= {"COMPLETE", "FAIL"} and failed.error.fillna("").str.strip().all(),
         f"{len(complete)} COMPLETE, {len(failed)} FAIL ({interrupted.sum()} cut off by a driver's death, "
         f"{(~interrupted).sum()} by their worker's)"),
        ("no Optuna trial RUNNING or WAITING", not unfinished, f"{unfinished or 'none'}"),
        ("every Optuna FAIL has a reason", not silent, f"without: {silent or 'none'}"),
        ("rows match Optuna trials, none lost", not unmatched and not missing,
         f"{len(rows)} rows, {len(trials)} Optuna trials ({len(trials) - len(rows)} repeats told without running); "
         f"unmatched {unmatched or 'none'}, missing {missing or 'none'}"),
        ("trial budget", counted == n_trials, f"{counted} counted of {n_trials}"),
        ("stored front = brute-force front", sorted(front.trial) == expected_front, f"{len(front)} trials"),
        ("each result is its schedule's", not wrong, f"wrong: {wrong or 'none'}"),
        ("password in no log, error or status", not leaks, f"found in: {leaks or 'none'}"),
    ]


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
        result = soak(postgres, workdir, address, args)
    print(f"\n3. soak: {args.soak_trials} trials of {args.soak_sleep:g} s, {args.soak_concurrent} at once, random "
          f"sampler, PostgreSQL with a password; {result['worker_kills']} trial workers and the driver "
          f"{result['driver_kills']} times SIGKILLed; {result['seconds']:.0f} s")
    for check, passed, detail in result["checks"]:
        print(f"  {'ok  ' if passed else 'FAIL'} {check}: {detail}")
    failed = [check for check, passed, _ in result["checks"] if not passed]
    if failed:
        print("the soak's driver log ends:\n" + "\n".join(result["log"].splitlines()[-15:]))
    k, sampler = max(k for k in args.concurrency if k <= 4), args.samplers[-1]
    sqlite, postgresql = per_trial["sqlite", sampler], per_trial["postgresql", sampler]
    print(f"result: scaling efficiency {efficiency[k]:.2f} at {k} concurrent trials (target 0.9), "
          f"{efficiency[args.concurrency[-1]]:.2f} at {args.concurrency[-1]}; driver overhead per trial "
          f"PostgreSQL / SQLite {postgresql / sqlite:.2f} ({postgresql:.0f} / {sqlite:.0f} ms, {sampler} sampler, "
          f"{args.overhead_trials} trials); soak: "
          + (f"FAILED {', '.join(failed)}" if failed else f"all {len(result['checks'])} checks passed"))
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-trials", type=int, default=200)
    parser.add_argument("--window", type=int, default=25, help="trials in the first and last windows of table 1")
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"])
    parser.add_argument("--sleep", type=float, default=1.5, help="seconds per trial when measuring scaling")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--trials-per-slot", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--soak-trials", type=int, default=300)
    parser.add_argument("--soak-sleep", type=float, default=0.5)
    parser.add_argument("--soak-concurrent", type=int, default=GPUS)
    parser.add_argument("--kill-fraction", type=float, default=0.2, help="worker kills per dispatched trial")
    parser.add_argument("--soak-timeout", type=float, default=1800)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small settings: checks the script, not the speed")
    args = parser.parse_args(argv)
    if args.quick:
        args.overhead_trials, args.window, args.sleep, args.concurrency, args.trials_per_slot = 6, 2, 0.1, [1, 2], 2
        args.repeats, args.soak_trials, args.soak_sleep, args.soak_concurrent, args.soak_timeout = 1, 10, 0.2, 2, 300
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
