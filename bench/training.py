"""Fine-tune step time of PPFlow variants against their training-FLOPs ratio, side by side.

For each schedule: one optimiser step of ``ppsearch.flow.train_step`` whose batch mixes stages
(t ~ U[0, 1) routes each sample to its stage's patch shape) against a step of the base schedule
(one stage at the base patch), with the analytic ratio ``train_step_macs`` of the two;
efficiency = speed-up x FLOPs ratio, the fraction of the FLOPs saving that became time. The
variant runs both ways a mixed batch can, each with its speed-up and efficiency: one pass per
patch shape (grouped) and packed (``packed=True``: one token stream with variable-length
attention on CUDA in half precision, else rows with a block-diagonal mask). Runs are interleaved (base, grouped, packed, base, ...), both variant paths draw the
same times at each repeat, and medians are taken.

    python bench/training.py --model S/2 --batch 8                        # CPU
    python bench/training.py --device cuda --model XL/2 --batch 32 128 256 --bf16
    python bench/training.py --quick                                      # CI: checks the script
"""
from __future__ import annotations

import statistics
import time

import torch

from ppsearch.flops import train_step_macs
from ppsearch.flow import train_step
from sampling import benchmark_model, common_arguments, describe


def time_step(model, optimizer, x1, y, schedule, packed, args, seed) -> float:
    """Seconds of one training step; ``seed`` fixes the step's times (and so its routing). No
    explicit synchronisation: train_step returns ``loss.item()``, which waits for the step."""
    generator = torch.Generator(x1.device).manual_seed(seed)
    start = time.perf_counter()
    train_step(model, optimizer, x1, y, schedule, generator, packed=packed, bf16=args.bf16, grad_clip=args.grad_clip)
    return time.perf_counter() - start


def measure(model, optimizer, batch, base_schedule, schedule, args, device):
    """Median seconds of the base, grouped and packed steps, interleaved, after a warm-up."""
    config = model.config
    x1 = torch.randn((batch, config.in_channels, *config.input_size), device=device)
    y = (torch.arange(batch) % config.num_classes).to(device)
    runs = [(base_schedule, False), (schedule, False), (schedule, True)]
    times = [[] for _ in runs]
    for repeat in range(-args.warmup, args.repeats):
        for (run_schedule, packed), seconds in zip(runs, times):
            elapsed = time_step(model, optimizer, x1, y, run_schedule, packed, args, seed=repeat)
            if repeat >= 0:
                seconds.append(elapsed)
    return [statistics.median(seconds) for seconds in times]


def run(args):
    device, model, schedules, base_schedule = benchmark_model(args)
    config = model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=device.type == "cuda")
    print(f"device {device} ({describe(device)}), "
          f"model {args.model}, latent {config.in_channels}x{config.input_size[0]}x{config.input_size[1]}, "
          f"AdamW, grad clip {args.grad_clip}, bf16 {args.bf16}, median of {args.repeats}")
    print(f"{'batch':>5} {'schedule':<24} {'FLOPs ratio':>11} {'base s':>8} | {'grouped s':>9} {'speed-up':>8} "
          f"{'efficiency':>10} | {'packed s':>8} {'speed-up':>8} {'efficiency':>10}")
    rows, results = [], []
    for batch in args.batch:
        base_macs = train_step_macs(config, base_schedule, batch)
        for schedule in schedules:
            try:
                times = measure(model, optimizer, batch, base_schedule, schedule, args, device)
            except torch.OutOfMemoryError:  # a batch too large for one device is a finding, not a crash
                times = None
            if times is None:  # out of the except block, so the failed step's tensors are freed
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                print(f"{batch:>5} {str(schedule):<24} out of memory")
                results.append(f"batch {batch} {schedule}: out of memory")
                continue
            base_s, grouped_s, packed_s = times
            ratio = train_step_macs(config, schedule, batch) / base_macs
            grouped, packed = base_s / grouped_s, base_s / packed_s
            rows.append((batch, str(schedule), ratio, grouped, grouped * ratio, packed, packed * ratio))
            print(f"{batch:>5} {str(schedule):<24} {ratio:>11.3f} {base_s:>8.3f} | {grouped_s:>9.3f} {grouped:>8.2f} "
                  f"{grouped * ratio:>10.2f} | {packed_s:>8.3f} {packed:>8.2f} {packed * ratio:>10.2f}")
            results.append(f"batch {batch} {schedule}: packed speed-up {packed:.2f}x vs FLOPs limit {1 / ratio:.2f}x "
                           f"(efficiency {packed * ratio:.2f}), grouped {grouped:.2f}x ({grouped * ratio:.2f})")
    print("result: " + ", ".join(results))
    return rows


def main(argv=None):
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8], help="one or more batch sizes")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.input_size, args.batch, args.repeats, args.warmup = 16, [4], 1, 1
    return run(args)


if __name__ == "__main__":
    main()
