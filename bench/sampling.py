"""Sampling speed of patch schedules against their FLOPs ratio, measured side by side.

For each schedule: wall-clock speed-up of sampling over the base schedule (one stage at the
base patch), the analytic GMACs ratio, and efficiency = speed-up / (1 / GMACs ratio), i.e. the
fraction of the FLOPs saving that turns into time. Runs are interleaved (base, schedule,
base, ...) and the median is taken, so drift hits both sides alike.

    python bench/sampling.py --model S/2 --batch 8 --steps 10            # CPU
    python bench/sampling.py --device cuda --model XL/2 --batch 32 --bf16 --cuda-graphs
    python bench/sampling.py --model embedded --batch 64 --front-of sqlite:///ppsearch.db  # a study's front
    python bench/sampling.py --quick                                    # CI: checks the script
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ppsearch.cli import resolve_model
from ppsearch.flops import sample_cost
from ppsearch.flow import SolverConfig, fixed_noise, sample
from ppsearch.models import ppflow_variant
from ppsearch.schedule import Schedule

PAPER_SCHEDULES = ["4x4@0.5,2x2", "4x4@0.5,2x4@0.75,2x2"]


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_sampling(model, schedule, noise, y, config, repeats, device):
    """Seconds of each of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        sample(model, schedule, noise, y, config)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def benchmark_model(args):
    """(device, variant with every schedule's patch shapes, schedules, base schedule) for ``args``."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = resolve_model(args.model, with_weights=True, input_size=args.input_size)
    texts = args.schedules
    if getattr(args, "front_of", None):  # a study's front, cheapest first, without the base schedule
        from ppsearch.query import QueryError, front
        from ppsearch.store import StoreError

        try:
            texts = [s for s in front(args.front_of, args.study).schedule if s != str(base.config.base_patch)]
        except (QueryError, StoreError) as err:
            raise SystemExit(f"--front-of: {err}") from None
    schedules = [Schedule.parse(s) for s in texts]
    patches = {p for s in schedules for p in s.patch_shapes}
    model = ppflow_variant(base, sorted(patches, key=str)).to(device)
    return device, model, schedules, Schedule.from_stages([base.config.base_patch])


def describe(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"


def run(args):
    device, model, schedules, base_schedule = benchmark_model(args)
    model.eval()
    config = model.config
    sampler = SolverConfig(steps=args.steps, solver=args.solver, guidance=args.cfg, bf16=args.bf16,
                            compile=args.compile, cuda_graphs=args.cuda_graphs)
    noise = fixed_noise(args.batch, (config.in_channels, *config.input_size), seed=0, device=device)
    y = (torch.arange(args.batch) % config.num_classes).to(device)
    base_macs = sample_cost(config, base_schedule, sampler).macs

    for schedule in [base_schedule, *schedules]:  # warm-up: allocator, compile, graph capture
        time_sampling(model, schedule, noise, y, sampler, args.warmup, device)
    print(f"device {device} ({describe(device)}), "
          f"model {args.model}, latent {config.in_channels}x{config.input_size[0]}x{config.input_size[1]}, batch {args.batch}, "
          f"{args.steps} {args.solver} steps, cfg {args.cfg}, bf16 {args.bf16}, compile {args.compile}, "
          f"cuda graphs {args.cuda_graphs}, median of {args.repeats}")
    print(f"{'schedule':<28} {'base s':>8} {'sched s':>8} {'speed-up':>8} {'GMACs ratio':>11} {'efficiency':>10}")
    rows = []
    for schedule in schedules:
        base_times, times = [], []
        for _ in range(args.repeats):
            base_times += time_sampling(model, base_schedule, noise, y, sampler, 1, device)
            times += time_sampling(model, schedule, noise, y, sampler, 1, device)
        speedup = statistics.median(base_times) / statistics.median(times)
        ratio = sample_cost(config, schedule, sampler).macs / base_macs
        rows.append((str(schedule), speedup, ratio, speedup * ratio))
        print(f"{str(schedule):<28} {statistics.median(base_times):>8.3f} {statistics.median(times):>8.3f} "
              f"{speedup:>8.2f} {ratio:>11.3f} {speedup * ratio:>10.2f}")
    print("result: " + ", ".join(f"{s}: speed-up {sp:.2f}x vs FLOPs limit {1 / r:.2f}x (efficiency {e:.2f})"
                                 for s, sp, r, e in rows))
    return rows


def common_arguments(description: str) -> argparse.ArgumentParser:
    """The options every model benchmark takes: which model and schedules, how to time, where."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="S/2", help="size from the model table (random weights), "
                                                       "embedded, or a checkpoint")
    parser.add_argument("--schedules", nargs="+", default=PAPER_SCHEDULES)
    parser.add_argument("--input-size", type=int, help="latent side for a table model (default 32: 256 px)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, not the speed")
    return parser


def main(argv=None):
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--solver", default="euler", choices=["euler", "heun"])
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--front-of", metavar="STORAGE", help="time the front of the study in this database "
                                                             "instead of --schedules")
    parser.add_argument("--study", default="toy", help="with --front-of: the study's name")
    args = parser.parse_args(argv)
    if args.quick:
        args.input_size, args.batch, args.steps, args.repeats, args.warmup = 16, 2, 4, 1, 1
    return run(args)


if __name__ == "__main__":
    main()
