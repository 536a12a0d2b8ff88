"""The ``ppsearch`` command. Each subcommand is a function ``cmd_NAME(args)``; user mistakes
raise ``ValueError`` subclasses (or ``FileNotFoundError``) and become one line and exit 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .flow import SamplerConfig
from .schedule import Schedule


def resolve_model(name_or_path: str, with_weights: bool):
    """A model from the size table (random weights, on the meta device when only its sizes
    are needed) or from a checkpoint file."""
    from .checkpoint import load_base
    from .models import PPFlow_models

    if name_or_path in PPFlow_models:
        if with_weights:
            return PPFlow_models[name_or_path]()
        with torch.device("meta"):
            return PPFlow_models[name_or_path]()
    if Path(name_or_path).suffix in (".pt", ".pth", ".safetensors") or Path(name_or_path).exists():
        return load_base(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: a checkpoint path or one of {', '.join(PPFlow_models)}")


def _sampler_args(parser):
    parser.add_argument("--steps", type=int, default=50, help="ODE steps in all, split over stages by length")
    parser.add_argument("--solver", choices=["euler", "heun"], default="euler")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale where the schedule sets none")


def cmd_flops(args):
    from .flops import sample_cost

    model = resolve_model(args.model, with_weights=False)
    schedule = Schedule.parse(args.schedule)
    schedule.check_for(model.config.input_size, model.config.base_patch)
    sampler = SamplerConfig(steps=args.steps, solver=args.solver, guidance=args.cfg)
    cost = sample_cost(model.config, schedule, sampler)
    base = sample_cost(model.config, Schedule.from_stages([model.config.base_patch]), sampler)
    report = {"model": args.model, "schedule": str(schedule), "steps": args.steps, "solver": args.solver,
              "vae_decode": "not counted", **cost.to_dict(), "relative_to_base": cost.macs / base.macs}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"model {args.model}  schedule {schedule}  {args.solver}, {args.steps} steps  (GMACs = DiT's 'GFLOPs'; FLOPs = 2 x MACs)")
    print(f"{'stage':>5} {'patch':>5} {'t':>13} {'steps':>5} {'cfg':>5} {'fwd':>5} {'GMACs/fwd':>10} {'GMACs':>10}")
    for i, s in enumerate(cost.stages):
        print(f"{i:>5} {str(s.patch):>5} {f'[{s.t_start:g}, {s.t_end:g})':>13} {s.steps:>5} {s.guidance:>5g} "
              f"{s.forwards:>5} {s.forward_macs / 1e9:>10.3f} {s.macs / 1e9:>10.2f}")
    print(f"per sample: {cost.gmacs:.2f} GMACs = {cost.gflops:.2f} GFLOPs (VAE decode not counted), "
          f"{100 * cost.macs / base.macs:.1f}% of the base schedule {model.config.base_patch}")


def cmd_sample(args):
    from .flow import fixed_noise, sample
    from .models import ppflow_variant

    model = resolve_model(args.model, with_weights=True)
    schedule = Schedule.parse(args.schedule)
    schedule.check_for(model.config.input_size, model.config.base_patch)
    model = ppflow_variant(model, schedule.patch_shapes)
    config = model.config
    noise = fixed_noise(args.num_samples, (config.in_channels, *config.input_size), args.seed)
    y = torch.arange(args.num_samples) % config.num_classes
    start = time.perf_counter()
    out = sample(model, schedule, noise, y, SamplerConfig(steps=args.steps, solver=args.solver, guidance=args.cfg))
    elapsed = time.perf_counter() - start
    print(f"sampled {args.num_samples} latents {tuple(out.shape[1:])} under {schedule} in {elapsed:.2f} s "
          f"({args.num_samples / elapsed:.1f} samples/s)")
    if args.out:
        torch.save(out, args.out)
        print(f"wrote {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="analytic compute of a schedule, per stage and per sample")
    p.add_argument("--model", required=True, help="model size (e.g. XL/2) or checkpoint path")
    p.add_argument("--schedule", required=True, help="e.g. 4x4@0.5,2x4@0.75,2x2")
    _sampler_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("sample", help="sample latents from a model under a schedule")
    p.add_argument("--model", required=True, help="model size (random weights) or checkpoint path")
    p.add_argument("--schedule", required=True)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the latents here (torch.save)")
    _sampler_args(p)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"ppsearch {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
