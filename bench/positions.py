"""Coarse levels' position embeddings: which base-grid coordinates should a coarse token carry?

Three conventions, measured side by side on the embedded base and the held-out digits:
- ``own-grid``: each level's own token grid, 0 .. n - 1 (ppsearch before issue 9);
- ``corner``: the base-grid position of the patch's top-left base token, (i * a, j * b) for an
  (a * bh) x (b * bw) patch (the official PPFlow code's ``get_2d_sincos_pos_embed(...,
  interpolate_w, interpolate_h)``);
- ``centre``: the centre of the base tokens the patch covers, (i * a + (a - 1) / 2, ...).

For each convention: the velocity MSE of PPF-3's stages at initialisation (the variant as PPFlow
initialises it, before any fine-tune; t uniform in each stage, the 1,000 reference digits, the
same noise for every convention), and the FID of PPF-2 and PPF-3 after the toy trainer's
fine-tune (``ppsearch.trial.run_trial``, the search's own trial body). The model code has one
convention (``ppsearch.models.level_positions``); this script swaps in the others.

    python bench/positions.py            # about 6 minutes on 2 cores
    python bench/positions.py --quick    # CI: checks the script (a few steps, 100 samples)
"""
from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ppsearch.models
from ppsearch.checkpoint import EMBEDDED_BASE, load_base
from ppsearch.config import load_trainer
from ppsearch.data import load_dataset
from ppsearch.flow import interpolate, velocity, velocity_target
from ppsearch.models import ppflow_variant
from ppsearch.schedule import Schedule
from ppsearch.trial import run_trial

SCHEDULES = {"PPF-2": "4x4@0.5,2x2", "PPF-3": "4x4@0.5,2x4@0.75,2x2"}
QUICK = ["steps=4", "eval.num_samples=100", "eval.batch_size=100", "eval.steps=4"]


def _own_grid(patch, base_patch, grid):
    return np.arange(grid[0]), np.arange(grid[1])


def _corner(patch, base_patch, grid):
    a, b = patch.h / base_patch.h, patch.w / base_patch.w
    return np.arange(grid[0]) * a, np.arange(grid[1]) * b


def _centre(patch, base_patch, grid):
    a, b = patch.h / base_patch.h, patch.w / base_patch.w
    return np.arange(grid[0]) * a + (a - 1) / 2, np.arange(grid[1]) * b + (b - 1) / 2


CONVENTIONS = {"own-grid": _own_grid, "corner": _corner, "centre": _centre}


def use(convention: str):
    """Make every level built from now on in this process use ``convention``."""
    ppsearch.models.level_positions = CONVENTIONS[convention]


@torch.no_grad()
def init_mse(convention: str, schedule: Schedule, draws: int, num: int) -> list[float]:
    """Velocity MSE of each stage of ``schedule`` at initialisation, t uniform in the stage."""
    use(convention)
    base = load_base(EMBEDDED_BASE).eval()
    variant = ppflow_variant(base, schedule.patch_shapes).eval()
    data = load_dataset(load_trainer("toy").data, "reference")
    x1, y = data.images[:num], data.labels[:num]
    generator = torch.Generator().manual_seed(0)
    errors = []
    for stage in schedule.stages:
        total = 0.0
        for _ in range(draws):
            t = stage.t_start + stage.length * torch.rand(len(x1), generator=generator)
            x0 = torch.randn(x1.shape, generator=generator)
            v = velocity(variant, interpolate(x0, x1, t), t, y, stage.patch)
            total += (v - velocity_target(x0, x1)).square().mean().item()
        errors.append(total / draws)
    return errors


def finetuned_fid(convention: str, overrides: list[str], schedule: str, out_dir: str) -> dict:
    """FID of ``schedule`` after the toy trial's fine-tune (runs in a worker process)."""
    use(convention)
    result = run_trial(load_trainer("toy", overrides), schedule, out_dir)
    return {"fid": result["fid"], "fid_std": result["fid_std"], "seconds": result["timings"]["total"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per stage for the init MSE")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + ["threads=1"]
    num = 100 if args.quick else 1000
    ppf3 = Schedule.parse(SCHEDULES["PPF-3"])
    rows = []
    for name in CONVENTIONS:
        mse = init_mse(name, ppf3, 1 if args.quick else args.draws, num)
        rows.append({"convention": name, **{f"mse {s.patch} [{s.t_start:g},{s.t_end:g})": e
                                             for s, e in zip(ppf3.stages, mse)}})
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        jobs = {(c, s): pool.submit(finetuned_fid, c, overrides, text, str(Path(tmp) / f"{c}-{s}"))
                for c in CONVENTIONS for s, text in SCHEDULES.items()}
        base = pool.submit(finetuned_fid, "corner", overrides, "2x2", str(Path(tmp) / "base")).result()
        results = {key: job.result() for key, job in jobs.items()}
    for row in rows:
        for s in SCHEDULES:
            r = results[row["convention"], s]
            row[f"FID {s}"] = f"{r['fid']:.1f} +- {r['fid_std']:.1f}"
    table = pd.DataFrame(rows)
    steps = load_trainer("toy", overrides).steps
    print(f"init MSE: velocity MSE at initialisation on {num} reference digits, {args.draws if not args.quick else 1} "
          f"draws per stage; FID after the toy fine-tune ({steps} steps); base 2x2 after the same fine-tune: "
          f"FID {base['fid']:.1f} +- {base['fid_std']:.1f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fid = {c: sum(results[c, s]["fid"] for s in SCHEDULES) for c in CONVENTIONS}
    best = min(fid, key=fid.get)
    print(f"result: lowest PPF-2 + PPF-3 FID after fine-tuning: {best} "
          + ", ".join(f"{c} {results[c, 'PPF-2']['fid']:.1f} / {results[c, 'PPF-3']['fid']:.1f}" for c in CONVENTIONS))


if __name__ == "__main__":
    main()
