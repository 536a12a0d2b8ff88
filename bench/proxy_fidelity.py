"""Proxy fidelity where users decide: does the search's short fine-tune rank schedules of about
the same cost as a long training would?

Schedules come from the search table (``bench/search_efficiency.py --make-table``: every
schedule of the coarse toy space, fine-tuned and scored once by the real trial) in cost bands:
within +-8% of PPF-2's GMACs and of PPF-3's (the cost a user has in mind), --per-band schedules
each, drawn with a fixed seed from the schedules in the band without looking at their FIDs.
Each is trained again --factor times longer by the real trial body (``run_trial``, same base,
same evaluation noise and labels). Per band: Kendall's tau-b between the proxy's FIDs (the
table's, i.e. the search's trial) and the long run's, and the regret: the long-run FID of the
proxy's pick minus the band's best long-run FID, against the noise of that difference (paired
on the common random numbers, ppsearch.query.difference). Target: tau >= 0.7 in every band and
regret within 2 sigma.

    python bench/proxy_fidelity.py            # about 40 minutes on 2 cores (10 schedules, 2,000 steps)
    python bench/proxy_fidelity.py --proxy warm --long-from bench/results/proxy_fidelity-toy.csv   # a warm-started
    python bench/proxy_fidelity.py --proxy rung0 --long-from bench/results/proxy_fidelity-toy.csv  # halving's rung 0
    python bench/proxy_fidelity.py --quick    # CI: checks the script (2 x 2 schedules, a few steps)
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from scipy.stats import kendalltau
from dataclasses import replace

from ppsearch.config import HalvingConfig, load_study, load_trainer
from ppsearch.data import load_dataset
from ppsearch.fidelity import rung_trainer
from ppsearch.flops import sample_cost
from ppsearch.flow import SolverConfig
from ppsearch.query import difference
from ppsearch.schedule import Schedule
from ppsearch.space import SearchSpace, baselines
from ppsearch.train import base_model
from ppsearch.trial import run_trial
from ppsearch.warm_start import Mixture, run_warm_start, warm_trainer

BENCH = Path(__file__).resolve().parent
TABLE = BENCH / "results" / "search_table-toy.csv"
TARGET_TAU, BAND = 0.7, 0.08
QUICK = ["eval.num_samples=100", "eval.batch_size=100", "eval.steps=4"]


def score(trainer: str, overrides: list[str], schedule: str, out_dir: str) -> dict:
    """One trial of ``schedule`` (runs in a worker process)."""
    result = run_trial(load_trainer(trainer, overrides), schedule, out_dir)
    return {"fid": result["fid"], "fid_std": result["fid_std"], "fid_details": result["fid_details"],
            "seconds": result["timings"]["total"]}


def bands(table: pd.DataFrame, trainer: str, per_band: int, seed: int) -> dict[str, list[str]]:
    """``per_band`` schedules within +-8% of each paper schedule's GMACs, drawn by GMACs alone."""
    config = load_trainer(trainer)
    data = load_dataset(config.data, "train")
    model = base_model(config, data.shape, data.num_classes).config
    solver = SolverConfig(steps=config.eval.steps, solver=config.eval.solver, guidance=config.eval.guidance)
    out = {}
    for name in ("PPF-2", "PPF-3"):
        centre = sample_cost(model, baselines(model.base_patch)[name], solver).gmacs
        inside = sorted(table[(table.gmacs - centre).abs() <= BAND * centre].schedule)
        if len(inside) < per_band:
            raise SystemExit(f"only {len(inside)} schedules of the table lie within +-{BAND:.0%} of {name}'s "
                             f"{centre:.4g} GMACs; need {per_band}")
        out[f"{name} +-{BAND:.0%} ({centre:.3g} GMACs)"] = random.Random(seed).sample(inside, per_band)
    return out


def proxy_scores(proxy: str, args, overrides: list[str], schedules: list[str], tmp: str, pool) -> dict:
    """Each schedule's FID under a cheaper proxy than the table's trial: ``warm`` (trials of
    --warm-trial-steps from one warm start of --warm-steps over the space's mixture) or
    ``rung0`` (successive halving's lowest rung: 2 rungs, eta 3)."""
    trainer = load_trainer(args.trainer, overrides)
    if proxy == "rung0":
        low = rung_trainer(trainer, HalvingConfig(rungs=2, eta=3), 0)
        extra = [f"steps={low.steps}", f"eval.num_samples={low.eval.num_samples}",
                 f"eval.batch_size={low.eval.batch_size}"]
        futures = {s: pool.submit(score, args.trainer, [*overrides, *extra, "threads=1"], s, f"{tmp}/rung0-{i}")
                   for i, s in enumerate(schedules)}
        return {s: f.result() for s, f in futures.items()}
    data = load_dataset(trainer.data, "train")
    base = base_model(trainer, data.shape, data.num_classes)
    space = SearchSpace(load_study("toy").search_space, base.config.base_patch, base.config.input_size)
    mixture = str(Mixture.of_space(space))
    warm = run_warm_start(warm_trainer(replace(trainer, threads=args.workers), args.warm_steps), mixture, f"{tmp}/warm")
    print(f"warm start: {args.warm_steps} steps of {mixture} in {warm['seconds']:.0f} s")
    extra = [f"steps={args.warm_trial_steps}", f"base={warm['checkpoint']}", "threads=1"]
    futures = {s: pool.submit(score, args.trainer, [*overrides, *extra], s, f"{tmp}/warm-{i}") for i, s in enumerate(schedules)}
    return {s: {**f.result(), "seconds": f.result()["seconds"] + warm["seconds"] / len(schedules)}
            for s, f in futures.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--trainer", default="toy", help="trainers/ member the table was made with")
    parser.add_argument("--factor", type=int, default=10, help="the long training has this many times the steps")
    parser.add_argument("--per-band", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="draws the schedules of each band")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--csv", default=None, help="where to write the table (default: no file)")
    parser.add_argument("--proxy", default="table", choices=("table", "warm", "rung0"),
                        help="the proxy ranked: the table's trial, a warm-started trial, or halving's lowest rung")
    parser.add_argument("--long-from", type=Path, default=None,
                        help="a CSV this script wrote: its long-run FIDs instead of training again")
    parser.add_argument("--warm-steps", type=int, default=400)
    parser.add_argument("--warm-trial-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    table = pd.read_csv(args.table, comment="#")
    if args.quick:
        args.per_band, args.factor, args.warm_steps, args.warm_trial_steps = 2, 1, 4, 2
    overrides = QUICK + ["steps=4"] if args.quick else []
    steps = load_trainer(args.trainer, overrides).steps * args.factor
    chosen = bands(table, args.trainer, args.per_band, args.seed)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    schedules = [s for members in chosen.values() for s in members]
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        if args.long_from:
            stored = pd.read_csv(args.long_from).set_index("schedule")
            long = {s: {"fid": stored.loc[s, "fid_long"], "fid_std": stored.loc[s, "std_long"], "fid_details": None,
                        "seconds": stored.loc[s, "s_long"]} for s in schedules}
        else:
            futures = {s: pool.submit(score, args.trainer, [*overrides, f"steps={steps}", "threads=1"], s,
                                      str(Path(tmp) / f"long-{i}")) for i, s in enumerate(schedules)}
            long = {s: f.result() for s, f in futures.items()}
        cheap = None if args.proxy == "table" else proxy_scores(args.proxy, args, overrides, schedules, tmp, pool)
    proxy = table.set_index("schedule")
    if cheap is not None:
        proxy = pd.DataFrame({"gmacs": proxy.gmacs, "fid": {k: v["fid"] for k, v in cheap.items()}}).dropna()
    rows, verdicts = [], []
    print(f"proxy: {dict(table=f'the table trial FIDs ({args.table.name})', rung0='halving rung 0 (2 rungs, eta 3)', warm=f'warm start {args.warm_steps} steps, trials {args.warm_trial_steps} steps')[args.proxy]}; "
          f"long: {steps} steps{' (from ' + args.long_from.name + ')' if args.long_from else ''} "
          f"({args.factor}x the trial's){' (quick: ' + ' '.join(overrides) + ')' if args.quick else ''}")
    for band, members in chosen.items():
        part = pd.DataFrame([{"band": band, "schedule": s, "gmacs": proxy.loc[s, "gmacs"],
                              "fid_proxy": proxy.loc[s, "fid"], "fid_long": long[s]["fid"],
                              "std_long": long[s]["fid_std"], "s_long": long[s]["seconds"],
                              **({"s_proxy": cheap[s]["seconds"]} if cheap else {})} for s in members])
        tau = kendalltau(part.fid_proxy, part.fid_long).statistic
        pick = part.loc[part.fid_proxy.idxmin()]
        best = part.loc[part.fid_long.idxmin()]
        as_row = lambda s: SimpleNamespace(fid=long[s]["fid"], fid_std=long[s]["fid_std"],  # noqa: E731
                                           fid_details=long[s]["fid_details"])
        regret, sigma = difference(as_row(pick.schedule), as_row(best.schedule))
        sigma = sigma if pick.schedule != best.schedule else float("nan")
        ok = tau >= TARGET_TAU and (regret == 0 or regret <= 2 * sigma)
        verdicts.append(ok)
        rows.append(part)
        print(f"\n{band}: Kendall tau {tau:.2f}; proxy's pick {pick.schedule} (long FID {pick.fid_long:.1f}), "
              f"band's best {best.schedule} ({best.fid_long:.1f}): regret {regret:.1f}"
              + (f" = {regret / sigma:.1f} sigma" if sigma == sigma else "") + f" -> {'met' if ok else 'MISSED'}")
        print(part.drop(columns="band").to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.csv:
        pd.concat(rows).to_csv(args.csv, index=False)
    taus = [kendalltau(p.fid_proxy, p.fid_long).statistic for p in rows]
    print(f"result: Kendall tau per band {', '.join(f'{t:.2f}' for t in taus)} (target >= {TARGET_TAU}, regret "
          f"within 2 sigma): {'met' if all(verdicts) else 'MISSED'}")


if __name__ == "__main__":
    main()
