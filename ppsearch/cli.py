"""The ``ppsearch`` command. Each subcommand is a function ``cmd_NAME(args)``; user mistakes
raise ``ValueError`` subclasses (or ``FileNotFoundError``) and become one line and exit 2."""
from __future__ import annotations

import argparse
import json
import numbers
import shlex
import sys
import time
from pathlib import Path

import torch

from .flow import SolverConfig
from .schedule import Schedule
from .store import hidden_password


def resolve_model(name_or_path: str, with_weights: bool, input_size: int | None = None):
    """A model named by size (``XL/2``), official name (``SiT-XL/2``, ``DiT-XL/2``) or official
    file name, with random weights (on the meta device when only its sizes are needed;
    ``input_size`` sets its latent side), or read from a checkpoint file that exists."""
    from .checkpoint import base_path, load_base
    from .models import build_named, parse_model_name

    if name_or_path == "embedded":
        return load_base(base_path(name_or_path))
    if Path(name_or_path).is_file():
        return load_base(name_or_path)
    if parse_model_name(name_or_path) is None and Path(name_or_path).suffix in (".pt", ".pth", ".safetensors"):
        return load_base(name_or_path)  # a missing checkpoint: its error names the file
    sizes = {"input_size": input_size} if input_size else {}
    if with_weights:
        return build_named(name_or_path, **sizes)
    with torch.device("meta"):
        return build_named(name_or_path, **sizes)


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
    sampler = SolverConfig(steps=args.steps, solver=args.solver, guidance=args.cfg)
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
    out = sample(model, schedule, noise, y, SolverConfig(steps=args.steps, solver=args.solver, guidance=args.cfg))
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


def _named_config(words: list[str], key: str, default: str | None, load):
    """``[KEY=NAME | FILE.yaml] [key=value ...]`` -> ``load(name or path, overrides)``."""
    from .config import ConfigError

    source, overrides = default, []
    for word in words:
        if word.startswith(f"{key}="):
            source = word.split("=", 1)[1]
        elif word.endswith((".yaml", ".yml")) and "=" not in word:
            source = word
        else:
            overrides.append(word)
    if source is None:
        raise ConfigError(f"name a {key} config: FILE.yaml or {key}=NAME")
    return load(source, overrides)


def _trainer_from_args(words: list[str], default: str | None):
    from .config import load_trainer

    return _named_config(words, "trainer", default, load_trainer)


def _study_from_args(words: list[str]):
    from .config import load_study

    return _named_config(words, "study", "toy", load_study)


def cmd_launch(args):
    if args.multirun:
        return _multirun(args)
    _launch(args, _study_from_args(args.overrides))


def _multirun(args):
    """One study per combination of the sweeps' values, one after the other, each named after
    its overrides (``toy-trainer.steps=100``)."""
    from .config import sweep

    fixed = [w for w in args.overrides if w.startswith("study=") or w.endswith((".yaml", ".yml"))]
    runs = sweep([w for w in args.overrides if w not in fixed])
    print(f"multirun: {len(runs)} studies")
    for overrides in runs:
        config = _study_from_args([*fixed, *overrides])
        swept = [o for o, original in zip(overrides, [w for w in args.overrides if w not in fixed]) if o != original]
        config.name = "-".join([config.name, *swept]) if swept else config.name
        print(f"multirun: study {config.name}")
        _launch(args, config)


def _launch(args, config):
    from . import query
    from .search import Driver, Interrupted, install_signal_handlers

    driver = Driver(config)
    install_signal_handlers(driver)
    try:
        summary = driver.run()
    except Interrupted as stop:
        words = " ".join(shlex.quote(w) for w in args.overrides)
        print(f"ppsearch launch: {stop}; resume with: ppsearch launch {hidden_password(words)}".rstrip(), file=sys.stderr)
        sys.exit(130 if stop.signal_name == "SIGINT" else 143)
    except KeyboardInterrupt:  # a second signal: at once
        print("ppsearch launch: stopped at once; running trials resume on the next launch", file=sys.stderr)
        sys.exit(130)
    front = query.front(config)
    print(f"study {config.name}: {summary['trials']} result{'s' if summary['trials'] != 1 else ''} in {summary['seconds'] / 60:.1f} min; "
          f"front ({len(front)} trials, GMACs per sample, speed-up over the base):\n{_front_text(front)}")
    if len(front):
        trial, why = query.pick(front, "knee")
        out = query.export_trial(config, trial=trial)
        print(f"picked {why}\nexported trial {trial} to {out}; train it with: ppsearch train {out}")


def _front_text(table) -> str:
    """A front as a table a person reads: FID with its noise, speed-up over the base schedule."""
    if table.empty:
        return "  (empty: no COMPLETE trial yet)"
    noise = table.fid_std.map(lambda std: f" +- {std:.2g}" if std == std else "")  # NaN: no estimate
    shown = table.assign(**{"GMACs": table.gmacs.map("{:.4g}".format),
                            "speed-up": table.speedup.map("{:.2f}x".format),
                            "FID": table.fid.map("{:.3g}".format) + noise, "baseline": table.baseline.fillna("")})
    rungs = []
    if "rung" in table and table.rung.notna().any():  # successive halving: each point's fidelity
        shown["rung"], rungs = table.rung.map(lambda r: "" if r is None or r != r else str(int(r))), ["rung"]
    return shown[["schedule", "GMACs", "speed-up", "FID", *rungs, "trial", "baseline"]].to_string(index=False)


def cmd_status(args):
    from . import query

    config = _study_from_args(args.overrides)
    with query.open_study(config) as view:
        table, front, lease, stored = view.trials(), view.front(), view.lease(), view.config()
        noise, warm = view.training_noise(), view.study.user_attrs.get("warm_start")
    counts = table.state.value_counts()
    states = ("COMPLETE", "FAIL", "RUNNING", "PRUNED", "WAITING")
    print(f"study {config.name} in {hidden_password(config.storage)}: {len(table)} trials, "
          + ", ".join(f"{counts.get(state, 0)} {state}" for state in states if counts.get(state, 0) or state in states[:3]))
    print(f"driver: {lease.describe()}" if lease else "driver: none running"
          + ("; the RUNNING trials were interrupted and resume on the next launch" if counts.get("RUNNING") else ""))
    print(_cost_text(table, stored, warm))
    if warm:
        print(f"warm start: {warm['steps']} steps of {warm['mixture']} (loss {warm['final_loss']:.4f}, "
              f"{warm['seconds']:.0f} s); every trial fine-tunes {stored.warm_start.trial_steps or stored.trainer.steps} "
              f"steps from it")
    if stored.halving.rungs > 1:
        per_rung = table[table.state == "COMPLETE"].rung.value_counts()
        print(f"successive halving: {stored.halving.rungs} rungs, eta {stored.halving.eta}; results per rung: "
              + ", ".join(f"rung {r}: {per_rung.get(r, 0)}" for r in range(stored.halving.rungs))
              + "; the front holds each schedule's highest rung")
    if noise:
        print(f"noise: FID +- is the sampling noise of each trial; training noise (the base trained twice, "
              f"trials {' and '.join(map(str, noise['trials'][0]))}, FID gap {noise['gaps'][0]:+.2f}) is about "
              f"+- {noise['std']:.2f} more per trial")
    pruned = table[table.state == "PRUNED"]
    if not pruned.empty:
        reasons = pruned.reason.fillna("?").str.replace(r" \d+$", " N", regex=True).str.replace(
            r"\(.*\)", "", regex=True).str.strip().value_counts()
        print("pruned (not counted, never a front point): " + ", ".join(f"{n} {reason}" for reason, n in reasons.items()))
    print(f"front ({len(front)} trials):\n{_front_text(front)}")
    failed = table[table.state == "FAIL"].sort_values("trial")
    if not failed.empty:
        print(f"failed ({len(failed)}):")
    for r in failed.itertuples():
        error = r.error.strip().splitlines()[0] if isinstance(r.error, str) and r.error.strip() else "no message"
        attempts = int(r.attempts) if r.attempts == r.attempts and r.attempts is not None else 1
        print(f"  trial {r.trial} {r.schedule} ({attempts} attempt{'s' if attempts != 1 else ''}): {error}")


def _cost_text(table, config, warm: dict | None = None) -> str:
    """Device-hours the study's trials took (trial wall time x GPUs per trial, or worker-hours
    on CPUs; every trial that ran, the base's replicate and the warm start included) and the
    projected remainder for the results the budget has left."""
    gpus = config.ray.num_gpus_per_trial
    unit = "GPU-hours" if gpus else "worker-hours"
    ran = table[table.state.isin(["COMPLETE", "FAIL", "PRUNED"]) & table.timings.map(lambda t: isinstance(t, dict))]
    seconds = [t.get("total", 0.0) for t in ran.timings]
    left = max(0, config.n_trials - int(table.state.isin(["COMPLETE", "FAIL"]).sum()))
    if not seconds:
        return f"compute: nothing finished yet; {left} results to go"
    per_trial = sum(seconds) * (gpus or 1) / 3600 / len(seconds)
    spent = per_trial * len(seconds) + (warm["seconds"] * (gpus or 1) / 3600 if warm else 0.0)
    return (f"compute: {spent:.3g} {unit} spent on {len(seconds)} trials run{' and the warm start' if warm else ''} "
            f"({per_trial:.3g} per trial); "
            f"about {per_trial * left:.3g} more for the {left} results left of n_trials={config.n_trials}")


def cmd_show(args):
    from . import query

    config = _study_from_args(args.overrides)
    with query.open_study(config) as view:
        table = view.trials()
    rows = table[table.trial == args.trial]
    if rows.empty:
        raise query.QueryError(f"study {config.name!r} has no trial {args.trial}; its trials are numbered 0 to "
                               f"{len(table) - 1}")
    print(_trial_text(rows.iloc[0]))


def _sparkline(values) -> str:
    bars = "▁▂▃▄▅▆▇█"
    low, high = min(values), max(values)
    return "".join(bars[int((v - low) / ((high - low) or 1) * (len(bars) - 1))] for v in values)


def _trial_text(r) -> str:
    """One trial as a person reads it."""
    lines = [f"trial {r.trial}: {r.schedule}  [{r.state}]" + (f"  baseline {r.baseline}" if isinstance(r.baseline, str) else "")]
    if r.gmacs == r.gmacs:
        lines.append(f"  compute   {r.gmacs:.4g} GMACs per sample ({r.speedup:.2f}x faster than the base)")
    if r.fid == r.fid:
        details = r.fid_details or {}
        lines.append(f"  FID       {r.fid:.2f} +- {r.fid_std or 0:.2f} ({details.get('num_samples', '?')} samples, "
                     f"{details.get('extractor', '?')})")
    if isinstance(r.losses, list) and r.losses:
        losses = [loss for _, loss in r.losses]
        lines.append(f"  loss      {losses[0]:.4f} -> {losses[-1]:.4f} over {int(r.losses[-1][0])} steps  "
                     f"{_sparkline(losses[:: max(1, len(losses) // 40)])}")
    if isinstance(r.timings, dict) and r.timings:
        lines.append("  seconds   " + ", ".join(f"{k} {v:.1f}" for k, v in r.timings.items()))
    for label, value in (("attempts", r.attempts), ("worker", r.worker), ("reason", r.reason),
                         ("stopped", r.interrupted), ("error", r.error)):
        if isinstance(value, numbers.Number) and value == value:
            lines.append(f"  {label:<9} {int(value) if float(value).is_integer() else value}")
        elif isinstance(value, str):
            lines.append(f"  {label:<9} " + "\n            ".join(value.strip().splitlines()))
    if isinstance(r.log_tail, list) and r.log_tail:
        lines.append("  last log lines:")
        lines += [f"    {line}" for line in r.log_tail]
    folder = r.checkpoint if isinstance(r.checkpoint, str) else r.folder
    if isinstance(folder, str):
        lines.append(f"  files     {folder} (model.safetensors, samples.png, trial.log; on the worker "
                     f"{str(r.worker).split(':')[0] if isinstance(r.worker, str) else 'that ran it'})")
    return "\n".join(lines)


def cmd_front(args):
    from . import query

    config = _study_from_args(args.overrides)
    table = query.front(config, max_gmacs=args.max_gmacs, max_fid=args.max_fid)
    if args.format == "csv":
        print(table[query.COLUMNS].to_csv(index=False), end="")
    elif args.format == "json":
        print(table[query.COLUMNS].to_json(orient="records", indent=2))
    else:
        print(f"front of study {config.name}: {len(table)} trials (GMACs per sample; speed-up over the base)")
        print(_front_text(table))


def cmd_plot(args):
    from . import query

    print(f"wrote {query.plot(_study_from_args(args.overrides), out=args.out, pick_how=args.pick)}")


def cmd_export(args):
    from . import query

    config = _study_from_args(args.overrides)
    trial = args.trial if args.pick is None else query.pick_trial(query.front(config), args.pick)
    out = query.export_trial(config, trial=trial, out=args.out, format=args.format)
    then = {"yaml": f"; train it with: ppsearch train {out}", "json": " (the schedule, its GMACs and FID)",
            "official": " (arguments of the official PPFlow code's train.py and sample.py)"}[args.format]
    print(f"exported trial {trial} of study {config.name} to {out}{then}")


def cmd_train(args):
    """Train; the first SIGINT or SIGTERM stops after the step in flight with a checkpoint, a
    second at once; either way one line says how to resume (exit 130 / 143)."""
    import signal
    import threading

    from .stopping import handle_stop_signals
    from .train import Stopped, evaluations, train

    config = _trainer_from_args(args.overrides, args.default_trainer)
    stop, signals = threading.Event(), []

    def request_stop(name):
        signals.append(name)
        stop.set()

    previous = handle_stop_signals(request_stop, stop.is_set)
    try:
        result = train(config, stop=stop.is_set)
    except KeyboardInterrupt as err:
        where = (f"checkpoint at step {err.step} in {config.out_dir}" if isinstance(err, Stopped) and err.saved
                 else f"no new checkpoint ({config.out_dir} keeps its last, if any)")
        name = signals[0] if signals else "SIGINT"
        words = " ".join(shlex.quote(w) for w in [args.command, *args.overrides])
        print(f"ppsearch {args.command}: stopped by {name}: {where}; resume with: ppsearch {words}", file=sys.stderr)
        sys.exit(143 if name == "SIGTERM" else 130)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    fid = result.fid or evaluations(Path(config.out_dir)).get(str(result.steps))
    fid_text = (f"; FID {fid['fid']:.2f} +- {fid['fid_std'] or 0:.2f} ({fid['num_samples']} samples, "
                f"{fid['extractor']})" if fid else "")
    if result.resumed_from >= result.steps:
        print(f"{config.schedule}: already trained to step {result.steps} in {config.out_dir} (raise steps to "
              f"train on){fid_text}; weights: {result.checkpoint}")
        return
    print(f"trained {config.schedule} for {result.steps} steps (final loss {result.final_loss:.4f}, "
          f"{result.steps_per_second:.2f} steps/s){fid_text}; weights: {result.checkpoint}")


def cmd_eval(args):
    from .data import load_dataset
    from .evaluate import Evaluator, save_grid
    from .train import base_model, build_model, resolve_device

    asked = [f"eval.num_samples={args.num_samples}"] if args.num_samples is not None else []
    config = _trainer_from_args([*args.overrides, *asked], "pretrain_tiny")  # ranges checked there
    config.base, config.schedule = args.checkpoint or "embedded", args.schedule
    config.eval.fid.progress = not args.json
    schedule = Schedule.parse(args.schedule)
    device = resolve_device(config.device)
    start = time.perf_counter()
    data = load_dataset(config.data, "train")
    base = base_model(config, data.shape, data.num_classes)  # a bad checkpoint or data fail here, first
    untrained = [str(p) for p in schedule.patch_shapes if p not in base.config.patch_shapes]
    model = build_model(config, data.shape, data.num_classes, base).to(device)
    evaluator = Evaluator(config.eval, config.data, device)
    result = evaluator(model, schedule)
    report = {"checkpoint": config.base, "untrained_patch_shapes": untrained, **result.to_dict(),
              "wall_seconds": time.perf_counter() - start}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        save_grid(result.images, out / "samples.png", title=f"{schedule}  ({args.checkpoint or 'the embedded base'})")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    fid = result.fid
    print(f"{schedule}: FID {fid.fid:.2f} +- {fid.fid_std or 0:.2f} ({fid.num_samples} samples, extractor "
          f"{fid.extractor} [{fid.extractor_weights}], reference {fid.reference_key})")
    print(f"  {result.gmacs:.4f} GMACs per sample ({100 * result.relative_gmacs:.1f}% of the base), "
          f"{result.sampler['solver']} {result.sampler['steps']} steps, cfg {result.sampler['guidance']}; "
          f"sampling {result.sampling_seconds:.1f} s, FID {result.fid_seconds:.1f} s, total {report['wall_seconds']:.1f} s"
          + (f"; levels {', '.join(untrained)} initialised from the base, not fine-tuned" if untrained else "")
          + (f"; wrote {args.out}/eval.json and samples.png" if args.out else ""))


DESCRIPTION = """Find the PPFlow patch schedules of a pretrained DiT/SiT that are Pareto-optimal in
(inference compute, FID): a search fine-tunes short variants of your base, one candidate schedule
(stages, boundaries, patch shapes, guidance) each, and keeps the study in a SQL database.

Start with `ppsearch launch` (the toy study on this machine), then `ppsearch status`,
`ppsearch front`, `ppsearch plot --out front.png` and `ppsearch export --pick knee`."""


def _epilog() -> str:
    from .config import available

    groups = {"studies (study=NAME)": "studies", "trainers (trainer=NAME)": "trainers",
              "search spaces (search_space=NAME)": "search_spaces"}
    return ("shipped configurations:\n" + "\n".join(f"  {label}: {', '.join(available(group))}"
                                                   for label, group in groups.items())
            + "\n\nA study file of your own (FILE.yaml) composes with these and with trainers/ or "
              "search_spaces/ folders beside it.\n`ppsearch COMMAND --help` for each command; "
              "`--cfg job` prints the composed config without running.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppsearch", description=DESCRIPTION, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = sub.add_parser("launch", help="run or resume a search (study=NAME, default toy; then key=value overrides)")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="launch one study per combination of comma-separated values (trainer.steps=100,200)")
    p.add_argument("overrides", nargs="*", help="study=NAME or FILE.yaml, trainer=NAME, search_space=NAME, "
                                                "key=value (e.g. n_trials=20 trainer.steps=200 storage=URL)")
    p.set_defaults(func=cmd_launch)

    study_words = "study=NAME (default toy) or FILE.yaml, then key=value overrides (e.g. storage=URL)"
    p = sub.add_parser("status", help="a study's trials by state, its front and its failures")
    p.add_argument("overrides", nargs="*", help=study_words)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("show", help="one trial: schedule, FID with noise, losses, timings, error, its files")
    p.add_argument("trial", type=int, help="the trial's number")
    p.add_argument("overrides", nargs="*", help=study_words)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("front", help="a study's Pareto front: schedule, GMACs, speed-up, FID +- noise")
    p.add_argument("--max-gmacs", type=float, help="only front trials with at most this many GMACs per sample")
    p.add_argument("--max-fid", type=float, help="only front trials with at most this FID")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("overrides", nargs="*", help=study_words)
    p.set_defaults(func=cmd_front)

    p = sub.add_parser("plot", help="a figure of a study: trials, front, baselines, the pick; hypervolume")
    p.add_argument("--out", required=True, help="the figure to write: .png, .svg or .pdf")
    p.add_argument("--pick", default="knee", help="the point marked as picked (as export --pick)")
    p.add_argument("overrides", nargs="*", help=study_words)
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="a trial's schedule: a full-training config for ppsearch train, JSON, or "
                                      "the official PPFlow code's arguments")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="a COMPLETE trial's number")
    which.add_argument("--pick", help="knee (the front's best trade-off) or best-fid-under-gmacs=X")
    p.add_argument("--format", choices=["yaml", "json", "official"], default="yaml",
                   help="yaml: a trainer config with the study's full-training recipe, which ppsearch train runs; "
                        "json: the schedule with the trial's GMACs and FID; official: arguments of the official "
                        "PPFlow code (PPF-2 and PPF-3 only)")
    p.add_argument("--out", help="the file to write (default: EXPORT_DIR/STUDY-trialN.yaml, .json or .sh)")
    p.add_argument("overrides", nargs="*", help=study_words)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="sample a model under a schedule and score it (FID, GMACs, time)")
    p.add_argument("--schedule", required=True)
    p.add_argument("--checkpoint", help="default: the embedded tiny base")
    p.add_argument("--num-samples", type=int, help="samples for FID (default: the trainer's eval.num_samples)")
    p.add_argument("--out", help="folder for eval.json and a PNG grid of samples")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="trainer=NAME or FILE.yaml (data and eval settings; default "
                                                "pretrain_tiny), then key=value overrides, e.g. eval.steps=50")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train a PPFlow variant from a trainer config (resumable; Ctrl-C checkpoints; "
                                     "num_workers=N trains on N Ray Train workers)")
    p.add_argument("overrides", nargs="*", help="FILE.yaml or trainer=NAME, then key=value overrides "
                                                "(e.g. num_workers=8 use_gpu=true)")
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
    for name, kind in {"launch": "study", "status": "study", "show": "study", "front": "study", "plot": "study",
                       "export": "study", "train": "trainer", "pretrain": "trainer", "eval": "trainer"}.items():
        sub.choices[name].add_argument("--cfg", choices=["job"], dest="print_config",
                                       help="print the composed config and stop")
        sub.choices[name].set_defaults(config_kind=kind)
    return parser


def main(argv=None):
    from .errors import PPSearchError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top level's
        parser._subparsers._group_actions[0].choices[args.command].error(
            f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if getattr(args, "print_config", None):
            return _print_config(args)
        args.func(args)
    except PPSearchError as err:  # a user's mistake or a missing resource; anything else is a bug
        print(f"ppsearch {args.command}: error: {_clipped(str(err))}", file=sys.stderr)
        sys.exit(2)


def _print_config(args):
    """``--cfg job``: the composed config, as the command would run it (credentials hidden)."""
    from .config import to_yaml

    if args.config_kind == "study":
        config = _study_from_args(args.overrides)
        config.storage = hidden_password(config.storage)
    else:
        config = _trainer_from_args(args.overrides, getattr(args, "default_trainer", None))
    print(to_yaml(config), end="")


def _clipped(text: str, limit: int = 400) -> str:
    """One line of at most ``limit`` characters: a 100,000-character schedule is not echoed."""
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line)} characters)"


if __name__ == "__main__":
    main()
