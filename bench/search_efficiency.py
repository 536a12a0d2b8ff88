"""Search efficiency: how soon each Optuna sampler finds the true front of the toy space.

1. The table (``--make-table``, about 45 minutes on 2 cores): the toy study on a coarse
   boundary grid (0.1, 0.3, 0.5, 0.7, 0.9: 91 distinct schedules), each schedule fine-tuned and
   scored once by the real pipeline (the search driver, Ray, the toy trainer and its FID)
   under Optuna's grid sampler. Written to --table as CSV, with a header saying how it was made.
2. The replay (default): each sampler runs the search driver over the same space for --seeds
   seeds, its trials answered from the table (``InlineRunner``: two pending at a time, as the
   toy study runs on 2 cores). After 10, 20, 40 counted trials and after a quarter of the
   table, the hypervolume of the front found so far relative to the table's true front, against
   two reference points: the whole table's (1.1 x its largest GMACs and FID, as ``ppsearch
   plot``), where most of the area lies where no user looks, and the region of interest's (the
   base's GMACs, 2 x the base's FID): schedules cheaper than the base that keep FID within 2x.
   Also: counted trials until 95% of each is found. Verdict on the region: the default reaches
   95% within a quarter of the table (mean of the seeds) and needs 1.5x fewer trials than random.
   Samplers: random, NSGA-II, TPE with Optuna's defaults, ppsearch's ``tpe`` (multivariate,
   grouped, the study default), GP. On request (--samplers), other settings of the default (``TPE_SETTINGS``).

    python bench/search_efficiency.py --make-table   # once: the table (about 45 minutes)
    python bench/search_efficiency.py                # the replay (about 10 minutes, most of it GP's)
    python bench/search_efficiency.py --samplers "tpe, 10 startup trials" "tpe, 3 startup trials" "tpe, constant liar"
    python bench/search_efficiency.py --quick        # CI: a 10-schedule space, stand-in FIDs
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from ppsearch import fidelity
from ppsearch.config import load_study
from ppsearch.query import hypervolume, hypervolume_history
from ppsearch.query import trials as study_trials
from ppsearch.runners import InlineRunner
from ppsearch.search import Driver, make_sampler

BENCH = Path(__file__).resolve().parent
TABLE = BENCH / "results" / "search_table-toy.csv"
COARSE = ["search_space.boundary_min=0.1", "search_space.boundary_max=0.9", "search_space.boundary_step=0.2"]
# --quick: a 10-schedule space whose "table" comes from the stand-in trial body (no training).
QUICK = ["search_space.patch_shapes=[8x8,4x4,2x2]", "search_space.boundary_min=0.25",
         "search_space.boundary_max=0.75", "search_space.boundary_step=0.25", "trainer.steps=1"]
BUDGETS = (10, 20, 40)
DEFAULT = "tpe (ppsearch default)"
SAMPLERS = {
    "random": lambda space, seed: make_sampler("random", seed, space),
    "nsga2": lambda space, seed: make_sampler("nsga2", seed, space),
    "tpe (Optuna defaults)": lambda space, seed: optuna.samplers.TPESampler(seed=seed),
    DEFAULT: lambda space, seed: make_sampler("tpe", seed, space),
    "gp": lambda space, seed: make_sampler("gp", seed, space),
}
# Other settings of the default, run on request (--samplers): none of them beat it.
TPE_SETTINGS = {
    "tpe, 10 startup trials": dict(n_startup_trials=10),
    "tpe, 3 startup trials": dict(n_startup_trials=3),
    "tpe, constant liar": dict(n_startup_trials=5, constant_liar=True),
}
OPTIONAL = {name: (lambda kw: lambda space, seed: optuna.samplers.TPESampler(
    multivariate=True, group=True, seed=seed, **kw))(kw) for name, kw in TPE_SETTINGS.items()}


def non_dominated(points: np.ndarray) -> list[int]:
    """Indices of the points no other point dominates (both objectives minimised): the rule the
    study's front uses (``ppsearch.fidelity.non_dominated``), on the rows of an array."""
    return fidelity.non_dominated({i: tuple(p) for i, p in enumerate(points)})


def study_config(storage: str, space: list[str], *extra: str):
    # Trials from the base, as the table was made (before the warm start became the toy's default).
    return load_study("toy", [f"storage={storage}", "replicate_base=false", "warm_start.steps=0", *space,
                              *extra])


def make_table(path: Path, space: list[str], trial_function: str | None):
    """Every schedule of the space through the real driver (grid sampler, Ray) into ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{Path(tmp) / 'grid.db'}"
        extra = [f"checkpoint_dir={tmp}/checkpoints", "sampler=grid", "baselines=false", "name=grid"]
        if trial_function:
            extra.append(f"trial_function={trial_function}")
        config = study_config(storage, space, *extra)
        driver = Driver(config)
        config.n_trials = len(driver.space.schedules())
        started = time.perf_counter()
        driver.run()
        minutes = (time.perf_counter() - started) / 60
        table = study_trials(storage, "grid")
    table = table[table.state == "COMPLETE"][["schedule", "gmacs", "fid", "fid_std"]].sort_values("gmacs")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=BENCH).stdout.strip() or "?"
    header = (f"# Every schedule of the toy search space with {' '.join(space)}, fine-tuned and scored once by "
              f"the toy trainer\n# (`python bench/search_efficiency.py --make-table`, commit {commit}, "
              f"{platform.node()}, {len(table)} trials in {minutes:.0f} min,\n# Optuna grid sampler, "
              f"{config.ray.num_cpus_per_trial} CPU per trial on a local Ray cluster)\n")
    path.write_text(header + table.to_csv(index=False, float_format="%.4f"))
    print(f"wrote {path}: {len(table)} schedules")


def table_runner(table: pd.DataFrame, slots: int) -> InlineRunner:
    """Trials answered from the table: ``run_trial``'s result keys, the table's numbers."""
    rows = table.set_index("schedule")

    def lookup(trainer, schedule: str, out_dir: str, shared=None) -> dict:
        row = rows.loc[schedule]
        return {"gmacs": row.gmacs, "relative_gmacs": row.gmacs / rows.gmacs.max(), "fid": row.fid,
                "fid_std": row.fid_std, "fid_details": {"source": "table"}, "timings": {"total": 0.0},
                "checkpoint": None, "worker": "table"}

    return InlineRunner(lookup, slots)


def replay(table: pd.DataFrame, space: list[str], sampler: str, seed: int, budget: int, slots: int,
           tmp: str) -> np.ndarray:
    """(GMACs, FID) of each counted trial, in order, of one seeded search answered from the table."""
    storage = f"sqlite:///{Path(tmp) / re.sub(r'[^a-z0-9]+', '_', f'{sampler}-{seed}')}.db"
    config = study_config(storage, space, f"n_trials={budget}", f"seed={seed}", f"checkpoint_dir={tmp}")
    driver = Driver(config, log=lambda line: None, runner=table_runner(table, slots))
    driver.study.sampler = {**SAMPLERS, **OPTIONAL}[sampler](driver.space, seed)
    driver.run()
    ran = [t for t in driver.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return np.array([t.values for t in sorted(ran, key=lambda t: t.number)])


def trials_to(history: list[float], share: float, whole: float) -> float:
    """Counted trials until the hypervolume reaches ``share`` of ``whole`` (inf: never)."""
    return next((k + 1 for k, v in enumerate(history) if v >= share * whole), math.inf)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--make-table", action="store_true")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--slots", type=int, default=2, help="trials pending at a time in the replay")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=[*SAMPLERS, *OPTIONAL])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = QUICK if args.quick else COARSE
    # The replays' SQLite files in memory where the OS offers it: their speed is not what is measured.
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        if args.quick:  # a table made by the real driver with the stand-in trial body
            sys.path.append(str(BENCH))  # the stand-in, here and (through PYTHONPATH) in Ray's workers
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
            args.table, args.seeds = Path(tmp) / "table.csv", 2
            make_table(args.table, space, "standin:standin_trial")
        elif args.make_table:
            make_table(args.table, space, None)
            return
        table = pd.read_csv(args.table, comment="#")
        points = table[["gmacs", "fid"]].to_numpy()
        base = table.set_index("schedule").loc["2x2"]
        references = {  # where the hypervolume is measured
            "whole table (1.1 x max GMACs, 1.1 x max FID)": 1.1 * points.max(axis=0),
            f"region of interest (base GMACs {base.gmacs:.3g}, 2 x base FID {2 * base.fid:.3g})":
                np.array([base.gmacs, 2 * base.fid]),
        }
        region = list(references)[1]
        true = {name: hypervolume(points, ref) for name, ref in references.items()}
        quarter = math.ceil(len(table) / 4)
        budgets = sorted({*(b for b in BUDGETS if b < len(table) / 2), quarter})
        rows = []
        for sampler in args.samplers:
            started = time.perf_counter()
            for seed in range(args.seeds):
                found = replay(table, space, sampler, seed, max(budgets), args.slots, tmp)
                for name, ref in references.items():
                    history = hypervolume_history(found, ref)
                    rows.append({"reference": name, "sampler": sampler, "seed": seed, "ran": len(history),
                                 "to 95%": trials_to(history, 0.95, true[name]),
                                 **{b: history[min(b, len(history)) - 1] / true[name] for b in budgets}})
            print(f"  {sampler}: {args.seeds} seeds in {time.perf_counter() - started:.0f} s", flush=True)
    shares = pd.DataFrame(rows)
    print(f"table {args.table.name}: {len(table)} schedules, true front of {len(non_dominated(points))} points; "
          f"a quarter of the table = {quarter} trials; {args.seeds} seeds per sampler")
    for name in references:
        part = shares[shares.reference == name]
        summary = part.groupby("sampler", sort=False)[budgets].agg(["mean", "min"])
        reach = part.groupby("sampler", sort=False)["to 95%"].agg(["mean", "max"])
        print(f"\nhypervolume share of the true front after N counted trials (mean, worst seed), {name}:")
        print((100 * summary).to_string(float_format=lambda v: f"{v:.1f}"))
        print(f"counted trials to reach 95% (mean, worst seed; inf: not within {max(budgets)}):\n"
              + reach.to_string(float_format=lambda v: f"{v:.1f}"))
    ran = shares[shares.reference == region].groupby("sampler", sort=False).ran.agg(["mean", "min"])
    print(f"\ntrials run before the search ended (budget {max(budgets)}; a search also ends after "
          f"proposals that add nothing), mean and min:\n" + ran.to_string(float_format=lambda v: f"{v:.1f}"))
    part = shares[shares.reference == region].groupby("sampler", sort=False)
    if DEFAULT not in part.groups or "random" not in part.groups:
        print(f"result: no verdict: the replay needs both {DEFAULT!r} and 'random' for one")
        return
    mean, worst = part[quarter].mean(), part[quarter].min()
    reach = part["to 95%"].mean()
    speedup = reach["random"] / reach[DEFAULT]
    met = mean[DEFAULT] >= 0.95 and speedup >= 1.5
    print(f"result: study default {DEFAULT.split()[0]} reaches {100 * mean[DEFAULT]:.1f}% of the region of "
          f"interest's hypervolume after {quarter} trials (worst seed {100 * worst[DEFAULT]:.1f}%; random "
          f"{100 * mean['random']:.1f}%), 95% in {reach[DEFAULT]:.1f} trials against random's {reach['random']:.1f} "
          f"({speedup:.2f}x fewer; targets 95% at a quarter and 1.5x: {'met' if met else 'MISSED'})")


if __name__ == "__main__":
    main()
