"""Cheaper proxies, measured against today's trials: the warm start and successive halving.

Three searches of the toy study run side by side in one process (the real driver, Ray on this
machine, the real trial), each on the coarse space of the search table (boundary grid 0.1 ..
0.9 step 0.2, 91 schedules; ``bench/search_efficiency.py --make-table``) with the same budget of
results (--n-trials, seed 0, no replicate):

- default: every trial fine-tunes the base for the trainer's 200 steps and scores 500 samples;
- warm start: one variant with every shape of the space fine-tuned once (--warm-steps), then
  each trial fine-tunes --warm-trial-steps from it;
- halving: successive halving, 2 rungs, eta 3 (rung 0: 67 steps, 167 samples).

For each: the compute spent, as multiply-adds (the trials' fine-tune and sampling GMACs plus the
warm start's: a count no other load on the machine changes) and as worker-hours (the trials' own
times plus the warm start's), the schedules explored, and the region hypervolume of its front (reference: the base's GMACs, 2 x the base's
FID) as a share of the table's, with each front schedule scored by the table (the trial's
fidelity, the same noise for all three), and that share per TMAC and per worker-hour.

    python bench/fidelity.py --seeds 0 1 2   # about 20 minutes per seed on 2 cores
    python bench/fidelity.py --quick    # CI: checks the script (a few steps, stand-in scoring)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ppsearch import query
from ppsearch.config import load_study
from ppsearch.flops import train_step_macs
from ppsearch.search import Driver
from ppsearch.warm_start import Mixture

BENCH = Path(__file__).resolve().parent
TABLE = BENCH / "results" / "search_table-toy.csv"
COARSE = ["search_space.boundary_min=0.1", "search_space.boundary_max=0.9", "search_space.boundary_step=0.2"]
QUICK = ["trainer.steps=6", "trainer.eval.num_samples=60", "trainer.eval.batch_size=60", "trainer.eval.steps=4"]


def methods(args) -> dict[str, list[str]]:
    return {
        "from the base": ["warm_start.steps=0"],
        f"warm start ({args.warm_steps} steps, trials {args.warm_trial_steps})":
            [f"warm_start.steps={args.warm_steps}", f"warm_start.trial_steps={args.warm_trial_steps}"],
        "halving (2 rungs, eta 3)": ["warm_start.steps=0", "halving.rungs=2", "halving.eta=3"],
    }


def run(name: str, overrides: list[str], folder: Path, n_trials: int, seed: int, quick: bool) -> dict:
    folder.mkdir(parents=True)
    config = load_study("toy", ["name=fidelity", f"storage=sqlite:///{folder / 'study.db'}",
                                f"checkpoint_dir={folder / 'ck'}", f"export_dir={folder / 'ex'}", "replicate_base=false",
                                f"n_trials={n_trials}", f"seed={seed}", *COARSE, *(QUICK if quick else []), *overrides])
    started = time.perf_counter()
    driver = Driver(config, log=lambda line: print(f"  [{name}, seed {seed}] {line}", flush=True))
    driver.run()
    wall = time.perf_counter() - started
    trials = query.trials(config)
    seconds = sum(t["total"] for t in trials.timings.dropna())
    gmacs = sum(c["train_gmacs"] + c["sampling_gmacs"] for c in trials.compute.dropna())
    warm = driver.study.user_attrs.get("warm_start")
    if warm:
        seconds += warm["seconds"]
        gmacs += train_step_macs(driver.model_config, Mixture.parse(warm["mixture"]),
                                 config.trainer.batch_size) * warm["steps"] / 1e9
    front = query.front(config)
    return {"method": name, "seed": seed, "results": int((trials.state == "COMPLETE").sum()),
            "schedules": trials[trials.state == "COMPLETE"].schedule.nunique(),
            "worker_hours": seconds / 3600, "tmacs": gmacs / 1e3, "wall_min": wall / 60, "front": list(front.schedule),
            "front_rungs": [int(r) for r in front.rung] if front.rung.notna().all() else []}


def region_share(schedules: list[str], table: pd.DataFrame) -> float:
    scored = table.set_index("schedule")
    base = scored.loc["2x2"]
    reference = np.array([base.gmacs, 2 * base.fid])
    points = scored[["gmacs", "fid"]].to_numpy()
    found = scored.loc[[s for s in schedules if s in scored.index], ["gmacs", "fid"]].to_numpy()
    return query.hypervolume(found, reference) / query.hypervolume(points, reference) if len(found) else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--warm-steps", type=int, default=400)
    parser.add_argument("--warm-trial-steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="the study's seed (sampler); each runs all three")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.n_trials, args.warm_steps, args.warm_trial_steps = 4, 4, 2
    table = pd.read_csv(args.table, comment="#")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (name, overrides) in enumerate(methods(args).items()):
                row = run(name, overrides, Path(tmp) / f"{seed}-{i}", args.n_trials, seed, args.quick)
                row["region_share"] = region_share(row["front"], table)
                row["share_per_worker_hour"] = row["region_share"] / row["worker_hours"]
                row["share_per_tmac"] = row["region_share"] / row["tmacs"]
                rows.append(row)
    out = pd.DataFrame(rows)
    print(f"\n{args.n_trials} results per search on the table's coarse space; region hypervolume of each front, "
          f"its schedules scored by {args.table.name}{' (quick: settings of the script only)' if args.quick else ''}")
    print(out.drop(columns=["front", "front_rungs"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for row in rows:
        rungs = f" (rungs {row['front_rungs']})" if row["front_rungs"] else ""
        print(f"front of {row['method']}, seed {row['seed']}: {', '.join(row['front'])}{rungs}")
    if args.csv:
        out.to_csv(args.csv, index=False)
    summary = out.groupby("method", sort=False).agg(
        share_mean=("region_share", "mean"), share_worst=("region_share", "min"), tmacs_mean=("tmacs", "mean"),
        worker_hours_mean=("worker_hours", "mean"), per_tmac_mean=("share_per_tmac", "mean"),
        per_tmac_worst=("share_per_tmac", "min"))
    print(f"\nover seeds {args.seeds}:")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    best, default = summary.per_tmac_mean.idxmax(), summary.index[0]
    ratio = lambda column: summary.loc[best, column] / summary.loc[default, column] if summary.loc[default, column] else float("inf")  # noqa: E731
    print(f"result: {best} finds the most region hypervolume per unit of compute, {ratio('per_tmac_mean'):.2f}x the "
          f"default's (worst seed {ratio('per_tmac_worst'):.2f}x): {100 * summary.loc[best, 'share_mean']:.1f}% of the "
          f"region (worst {100 * summary.loc[best, 'share_worst']:.1f}%) for {summary.loc[best, 'tmacs_mean']:.1f} TMACs "
          f"against {100 * summary.loc[default, 'share_mean']:.1f}% (worst {100 * summary.loc[default, 'share_worst']:.1f}%) "
          f"for {summary.loc[default, 'tmacs_mean']:.1f}")


if __name__ == "__main__":
    main()
