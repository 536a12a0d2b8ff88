"""Search efficiency: how soon each Optuna sampler finds the true front of the toy space.

1. The table (``--make-table``, about 45 minutes on 2 cores): the toy study on a coarse
   boundary grid (0.1, 0.3, 0.5, 0.7, 0.9: 91 distinct schedules), each schedule fine-tuned and
   scored once by the real pipeline (the search driver, Ray, the toy trainer and its FID)
   under Optuna's grid sampler. Written to --table as CSV, with a header saying how it was made.
2. The replay (default): each sampler runs the search driver over the same space for --seeds
   seeds, its trials answered from the table (``InlineRunner``: two pending at a time, as the
   toy study runs on 2 cores). After 10, 20, 40 counted trials and after a quarter of the
   table, the hypervolume of the front found so far relative to the table's true front
   (reference point: 1.1 x the table's largest GMACs and FID, as ``ppsearch plot``).
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

from ppsearch.config import load_study
from ppsearch.query import hypervolume_history
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
    """Indices of the points no other point dominates (both objectives minimised)."""
    return [i for i, p in enumerate(points) if not any((q <= p).all() and (q < p).any() for q in points)]


def study_config(storage: str, space: list[str], *extra: str):
    return load_study("toy", [f"storage={storage}", *space, *extra])


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
           reference: np.ndarray, tmp: str) -> list[float]:
    """The hypervolume after each counted trial of one seeded search answered from the table."""
    storage = f"sqlite:///{Path(tmp) / re.sub(r'[^a-z0-9]+', '_', f'{sampler}-{seed}')}.db"
    config = study_config(storage, space, f"n_trials={budget}", f"seed={seed}", f"checkpoint_dir={tmp}")
    driver = Driver(config, log=lambda line: None, runner=table_runner(table, slots))
    driver.study.sampler = {**SAMPLERS, **OPTIONAL}[sampler](driver.space, seed)
    driver.run()
    ran = [t for t in driver.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    return hypervolume_history(np.array([t.values for t in sorted(ran, key=lambda t: t.number)]), reference)


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
        reference = 1.1 * points.max(axis=0)
        true_front = hypervolume_history(points, reference)[-1]  # as `ppsearch plot` computes it
        quarter = math.ceil(len(table) / 4)
        budgets = sorted({*(b for b in BUDGETS if b < len(table) / 2), quarter})
        rows = []
        for sampler in args.samplers:
            started = time.perf_counter()
            for seed in range(args.seeds):
                history = replay(table, space, sampler, seed, max(budgets), args.slots, reference, tmp)
                rows.append({"sampler": sampler, "seed": seed, "ran": len(history), **{
                    b: history[min(b, len(history)) - 1] / true_front for b in budgets}})
            print(f"  {sampler}: {args.seeds} seeds in {time.perf_counter() - started:.0f} s", flush=True)
    shares = pd.DataFrame(rows)
    summary = shares.groupby("sampler", sort=False)[budgets].agg(["mean", "min"])
    ran = shares.groupby("sampler", sort=False).ran.agg(["mean", "min"])
    print(f"table {args.table.name}: {len(table)} schedules, true front of "
          f"{len(non_dominated(points))} points; "
          f"hypervolume share of the true front after N counted trials (mean and worst over {args.seeds} seeds), "
          f"a quarter of the table = {quarter} trials")
    print((100 * summary).to_string(float_format=lambda v: f"{v:.1f}"))
    print(f"trials run before the search ended (budget {max(budgets)}; a search also ends after "
          f"proposals that add nothing), mean and min:\n" + ran.to_string(float_format=lambda v: f"{v:.1f}"))
    mean = shares.groupby("sampler", sort=False)[budgets].mean()
    if DEFAULT not in mean.index or "random" not in mean.index:
        print(f"result: no verdict: the replay needs both {DEFAULT!r} and 'random' for one")
        return
    beats_random = all(mean.loc[DEFAULT, b] >= mean.loc["random", b] for b in budgets)
    at_quarter = mean.loc[DEFAULT, quarter]
    print(f"result: study default {DEFAULT.split()[0]} reaches {100 * at_quarter:.1f}% of the true front's "
          f"hypervolume after {quarter} trials (a quarter of {len(table)}; target >= 95%: "
          f"{'met' if at_quarter >= 0.95 else 'MISSED'}); at or above random at every budget: "
          f"{'yes' if beats_random else 'no'}")


if __name__ == "__main__":
    main()
