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


def resolve_model(name_or_path: str, with_weights: bool, input_size: int | None = None):
    """A model from the size table (random weights, on the meta device when only its sizes
    are needed; ``input_size`` sets its latent side) or from a checkpoint file."""
    from .checkpoint import load_base
    from .models import PPFlow_models

    if name_or_path in PPFlow_models:
        sizes = {"input_size": input_size} if input_size else {}
        if with_weights:
            return PPFlow_models[name_or_path](**sizes)
        with torch.device("meta"):
            return PPFlow_models[name_or_path](**sizes)
    if Path(name_or_path).suffix in (".pt", ".pth", ".safetensors") or Path(name_or_path).exists():
        return load_base(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: a checkpoint path or one of {', '.join(PPFlow_models)}")


def _model_args(parser, help):
    parser.add_argument("--model", required=True, help=help)
    parser.add_argument("--input-size", type=int, help="latent side for a table model (default 32: 256 px images)")


def _sampler_args(parser):
    parser.add_argument("--steps", type=int, default=50, help="ODE steps in all, split over stages by length")
    parser.add_argument("--solver", choices=["euler", "heun"], default="euler")
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale where the schedule sets none")


def cmd_flops(args):
    from .flops import sample_cost

    model = resolve_model(args.model, with_weights=False, input_size=args.input_size)
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

    model = resolve_model(args.model, with_weights=True, input_size=args.input_size)
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


def cmd_latents(args):
    from .latents import LatentShards, precompute_latents

    start = time.perf_counter()
    out = precompute_latents(args.images, args.vae, args.out, split=args.split, image_size=args.image_size,
                             batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                             dtype=args.dtype, workers=args.workers, overwrite=args.overwrite)
    data = LatentShards(args.out, args.split)
    print(f"{out}: {len(data)} latents {data.shape} of {data.num_classes} classes, complete "
          f"in {time.perf_counter() - start:.1f} s (scale factor {data.scale_factor})")


def cmd_features(args):
    from .features import save_digits_classifier, train_digits_classifier

    recipe = {"epochs": args.epochs} if args.epochs is not None else {}
    model, report = train_digits_classifier(seed=args.seed, **recipe)
    save_digits_classifier(model, args.out, report)
    print(f"reference accuracy {100 * report['reference_accuracy']:.2f}% after {report['epochs']} epochs "
          f"in {report['train_seconds']} s; wrote {args.out}")


def _trainer_from_args(words: list[str], default: str | None):
    """``[trainer=NAME | FILE.yaml] [key=value ...]`` -> a TrainerConfig."""
    from .config import ConfigError, load_trainer

    source, overrides = default, []
    for word in words:
        if word.startswith("trainer="):
            source = word.split("=", 1)[1]
        elif word.endswith((".yaml", ".yml")) and "=" not in word:
            source = word
        else:
            overrides.append(word)
    if source is None:
        raise ConfigError("name a trainer config: FILE.yaml or trainer=NAME")
    return load_trainer(source, overrides)


def cmd_train(args):
    from .train import train

    config = _trainer_from_args(args.overrides, args.default_trainer)
    result = train(config)
    print(f"trained {config.schedule} for {result.steps} steps (final loss {result.final_loss:.4f}, "
          f"{result.steps_per_second:.2f} steps/s); weights: {result.checkpoint}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="analytic compute of a schedule, per stage and per sample")
    _model_args(p, "model size (e.g. XL/2) or checkpoint path")
    p.add_argument("--schedule", required=True, help="e.g. 4x4@0.5,2x4@0.75,2x2")
    _sampler_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("sample", help="sample latents from a model under a schedule")
    _model_args(p, "model size (random weights) or checkpoint path")
    p.add_argument("--schedule", required=True)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the latents here (torch.save)")
    _sampler_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="train a PPFlow variant from a trainer config (resumable)")
    p.add_argument("overrides", nargs="*", help="FILE.yaml or trainer=NAME, then key=value overrides")
    p.set_defaults(func=cmd_train, default_trainer=None)

    p = sub.add_parser("pretrain", help="pretrain the embedded tiny base (trainer pretrain_tiny; resumable)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the trainer, e.g. steps=100")
    p.set_defaults(func=cmd_train, default_trainer="pretrain_tiny")

    p = sub.add_parser("latents", help="encode an image folder into VAE latent shards (resumes an interrupted run)")
    p.add_argument("--images", required=True, help="ImageNet-style folder: DIR/<class_name>/*.jpg|png")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (e.g. sd-vae-ft-ema)")
    p.add_argument("--out", required=True, help="dataset folder; the split goes to OUT/<split>")
    p.add_argument("--split", default="train")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=16384, help="samples per shard file")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage type of latents")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--workers", type=int, help="image-decoding processes (default: up to 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or foreign dataset in OUT/<split>")
    p.set_defaults(func=cmd_latents)

    p = sub.add_parser("features", help="(re)train the digits classifier whose features the embedded FID uses")
    p.add_argument("--out", required=True, help="write its weights here (.safetensors)")
    p.add_argument("--epochs", type=int, help="default: the shipped weights' recipe")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_features)
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
