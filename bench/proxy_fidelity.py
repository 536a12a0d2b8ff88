"""Proxy fidelity: does the search's short fine-tune rank schedules as a longer one would?

Each schedule runs the real trial body (``ppsearch.trial.run_trial``: fine-tune the embedded
base's variant, sample with the study's fixed noise and labels, FID) twice, with the trainer's
``steps`` and with --factor times as many; the two FID rankings are compared by Kendall's tau-b.
The default schedules are six points spread along the front of the toy study (``ppsearch
launch``, 10 trials), from the base to the cheapest. Trials run --workers at a time, one thread
each; the table is also written as CSV.

    python bench/proxy_fidelity.py            # about 15 minutes on 2 cores (6 schedules, 200 and 800 steps)
    python bench/proxy_fidelity.py --quick    # CI: checks the script (3 schedules, a few steps)
"""
from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from scipy.stats import kendalltau

from ppsearch.config import load_trainer
from ppsearch.trial import run_trial

FRONT = ["2x2", "8x8@0.15,2x2", "4x2@0.65,2x2", "4x4@0.5,2x2", "4x4@0.5,2x4@0.75,2x2", "4x4@0.9,2x2"]
TARGET_TAU = 0.7
QUICK = ["steps=4", "eval.num_samples=100", "eval.batch_size=100", "eval.steps=4"]


def score(trainer: str, overrides: list[str], schedule: str, out_dir: str) -> dict:
    """One trial of ``schedule``: its FID and how long it took (runs in a worker process)."""
    config = load_trainer(trainer, overrides)
    result = run_trial(config, schedule, out_dir)
    return {"fid": result["fid"], "fid_std": result["fid_std"], "gmacs": result["gmacs"],
            "seconds": result["timings"]["total"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", nargs="+", default=FRONT)
    parser.add_argument("--trainer", default="toy", help="trainers/ member (the short fine-tune)")
    parser.add_argument("--factor", type=int, default=4, help="the long fine-tune has this many times the steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--override", nargs="*", default=[], help="trainer overrides for both runs (KEY=VALUE)")
    parser.add_argument("--csv", default=None, help="where to write the table (default: no file)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    schedules, overrides = (args.schedules[:1] + args.schedules[-2:], QUICK) if args.quick else \
        (args.schedules, args.override)
    steps = load_trainer(args.trainer, overrides).steps
    runs = {"short": overrides + [f"steps={steps}"], "long": overrides + [f"steps={args.factor * steps}"]}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {(s, run): pool.submit(score, args.trainer, o + ["threads=1"], s, str(Path(tmp) / f"{run}-{i}"))
                   for i, s in enumerate(schedules) for run, o in runs.items()}
        results = {key: future.result() for key, future in futures.items()}
    table = pd.DataFrame([{
        "schedule": s, "gmacs": results[s, "short"]["gmacs"],
        "fid_short": results[s, "short"]["fid"], "std_short": results[s, "short"]["fid_std"],
        "fid_long": results[s, "long"]["fid"], "std_long": results[s, "long"]["fid_std"],
        "s_short": results[s, "short"]["seconds"], "s_long": results[s, "long"]["seconds"],
    } for s in schedules])
    table["rank_short"] = table.fid_short.rank().astype(int)
    table["rank_long"] = table.fid_long.rank().astype(int)
    tau = kendalltau(table.fid_short, table.fid_long).statistic
    print(f"trainer {args.trainer}: short = {steps} steps, long = {args.factor * steps} steps"
          f"{' (overrides: ' + ' '.join(overrides) + ')' if overrides else ''}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
    verdict = "met" if tau >= TARGET_TAU else "MISSED"
    print(f"result: Kendall tau {tau:.2f} between {steps}-step and {args.factor * steps}-step FID rankings of "
          f"{len(schedules)} schedules (target >= {TARGET_TAU}: {verdict})")


if __name__ == "__main__":
    main()
