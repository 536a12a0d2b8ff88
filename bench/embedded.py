"""The embedded default's budgets: scoring one schedule with 1,000 samples end to end (load the
base, sample, FID) in under 60 s, and pretraining the tiny base in under 15 minutes, both on
the machine this runs on. Pretraining is timed over its first steps and projected to the
recipe's length (the rate is flat after the first steps).

With --reproduce it runs the pretrain_tiny recipe in full (about 20 minutes on 2 cores) and
scores the base it makes beside the shipped one, on the same noise, labels and reference:
"comparable" is within half again of the shipped FID or 10 points, whichever is larger, and
far better than a coarse-only 8x8 (exit 1 otherwise). This was a slow test until its 20
minutes took half of CI's budget.

    python bench/embedded.py               # full: 1,000 samples, 200 pretraining steps timed
    python bench/embedded.py --quick       # CI: checks the script, not the budgets
    python bench/embedded.py --reproduce   # the whole recipe, made against shipped
    python bench/embedded.py --plateau 1200   # FID against steps of the shipped base trained on (about 10 minutes)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ppsearch.config import load_trainer
from ppsearch.data import load_dataset
from ppsearch.evaluate import Evaluator
from ppsearch.schedule import Schedule
from ppsearch.train import build_model, train

EVAL_BUDGET_S = 60.0
PRETRAIN_BUDGET_S = 15 * 60.0


def time_eval(schedule: str, num_samples: int, cache_dir: str) -> float:
    """Seconds to score ``schedule`` from scratch: base, evaluator (reference stats), samples, FID."""
    start = time.perf_counter()
    config = load_trainer("toy", [f"schedule={schedule}", f"eval.num_samples={num_samples}",
                                  f"eval.fid.cache_dir={cache_dir}"])
    data = load_dataset(config.data, "train")
    model = build_model(config, data.shape, data.num_classes)
    result = Evaluator(config.eval, config.data, torch.device("cpu"))(model, Schedule.parse(schedule))
    print(f"  {schedule}: FID {result.fid.fid:.2f} +- {result.fid.fid_std:.2f} ({num_samples} samples)")
    return time.perf_counter() - start


def time_pretraining(steps: int, out_dir: str) -> tuple[float, int]:
    """(projected seconds of the whole pretrain_tiny recipe, its steps) from ``steps`` timed steps."""
    recipe = load_trainer("pretrain_tiny")
    warm = load_trainer("pretrain_tiny", ["steps=5", "progress=false", f"out_dir={out_dir}", "checkpoint_every=0"])
    train(warm)  # data, model, first steps: not representative
    timed = load_trainer("pretrain_tiny", [f"steps={5 + steps}", "progress=false", f"out_dir={out_dir}",
                                           "checkpoint_every=0"])
    result = train(timed)
    return recipe.steps / result.steps_per_second, recipe.steps


def reproduce(out_dir: str) -> bool:
    """Run the pretrain_tiny recipe in full; print the made and the shipped base's FID."""
    from ppsearch.checkpoint import EMBEDDED_BASE, load_base

    config = load_trainer("pretrain_tiny", [f"out_dir={out_dir}/run", "progress=false",
                                            f"eval.fid.cache_dir={out_dir}/fid"])
    start = time.perf_counter()
    made_model = train(config).model
    minutes = (time.perf_counter() - start) / 60
    evaluator = Evaluator(config.eval, config.data, torch.device("cpu"))
    made = evaluator(made_model, Schedule.parse("2x2")).fid
    shipped = evaluator(load_base(EMBEDDED_BASE), Schedule.parse("2x2")).fid
    coarse = evaluator(load_base(EMBEDDED_BASE).add_patch_shapes(["8x8"]), Schedule.parse("8x8")).fid
    comparable = made.fid < max(1.5 * shipped.fid, shipped.fid + 10) and made.fid < 100 < coarse.fid
    print(f"recipe ({config.steps} steps, {minutes:.1f} min): FID {made.fid:.2f} +- {made.fid_std:.2f}; shipped base "
          f"{shipped.fid:.2f} +- {shipped.fid_std:.2f}; coarse-only 8x8 from it {coarse.fid:.1f}")
    print(f"result: the recipe's base is {'comparable to' if comparable else 'NOT comparable to'} the shipped one")
    return comparable


def plateau(out_dir: str, steps: int, every: int) -> None:
    """FID against steps of the shipped base trained on under its own recipe (pretrain_tiny,
    fresh optimiser and warm-up): whether the base the toy fine-tunes sits near its plateau."""
    from ppsearch.train import evaluations

    config = load_trainer("pretrain_tiny", ["base=embedded", f"steps={steps}", f"eval_every={every}",
                                            "eval_at_end=true", f"out_dir={out_dir}/run", "progress=false",
                                            "log_every=0", "checkpoint_every=0", f"eval.fid.cache_dir={out_dir}/fid"])
    from ppsearch.checkpoint import EMBEDDED_BASE, load_base

    shipped = Evaluator(config.eval, config.data, torch.device("cpu"))(load_base(EMBEDDED_BASE), Schedule.parse("2x2")).fid
    start = time.perf_counter()
    train(config, log=lambda line: None)
    curve = {0: (shipped.fid, shipped.fid_std), **{int(k): (v["fid"], v["fid_std"]) for k, v in
                                                    evaluations(Path(f"{out_dir}/run")).items()}}
    print(f"the shipped base (2,400 pretraining steps) trained on for {steps} more steps ({config.eval.num_samples} "
          f"FID samples, {(time.perf_counter() - start) / 60:.1f} min):")
    for step, (fid, std) in sorted(curve.items()):
        print(f"  +{step:5d} steps: FID {fid:.2f} +- {std:.2f}")
    best = min(fid for fid, _ in curve.values())
    sigma = (shipped.fid_std ** 2 + min(curve.values())[1] ** 2) ** 0.5
    print(f"result: shipped {shipped.fid:.2f}, best after more steps {best:.2f} ({(shipped.fid - best) / sigma:.1f} sigma): "
          f"{'near its plateau' if shipped.fid - best <= 2 * sigma else 'NOT at its plateau'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=200, help="steps timed to project the recipe")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reproduce", action="store_true", help="run the whole pretrain_tiny recipe")
    parser.add_argument("--plateau", type=int, default=0, metavar="STEPS",
                        help="train the shipped base on for STEPS steps, FID every STEPS / 3")
    args = parser.parse_args(argv)
    if args.plateau:
        with tempfile.TemporaryDirectory() as tmp:
            plateau(tmp, args.plateau, max(1, args.plateau // 3))
        return
    if args.reproduce:
        with tempfile.TemporaryDirectory() as tmp:
            raise SystemExit(0 if reproduce(tmp) else 1)
    if args.quick:
        args.num_samples, args.pretrain_steps = 100, 5
    print(f"CPU threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        eval_s = time_eval("2x2", args.num_samples, f"{tmp}/fid")
        pretrain_s, recipe_steps = time_pretraining(args.pretrain_steps, f"{tmp}/pretrain")
    print(f"scoring 2x2 with {args.num_samples} samples: {eval_s:.1f} s (budget {EVAL_BUDGET_S:.0f} s)")
    print(f"pretraining ({recipe_steps} steps, projected from {args.pretrain_steps}): {pretrain_s / 60:.1f} min "
          f"(budget {PRETRAIN_BUDGET_S / 60:.0f} min)")
    print(f"result: eval {eval_s / EVAL_BUDGET_S:.2f} of its budget, pretraining {pretrain_s / PRETRAIN_BUDGET_S:.2f} "
          f"of its budget")


if __name__ == "__main__":
    main()
