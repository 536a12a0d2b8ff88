"""Typed configuration: Hydra config groups (``trainers/``, ``search_spaces/``, ``studies/``,
shipped inside the package under ``ppsearch/conf``) composed with command-line overrides and
checked against dataclasses, so a typo fails at start with the key's name."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import PPSearchError
from .data import DataConfig
from .fid import FIDConfig

CONFIG_DIR = Path(__file__).parent / "conf"
_SINGULAR = {"trainers": "trainer", "search_spaces": "search space", "studies": "study"}
T = TypeVar("T")


class ConfigError(PPSearchError):
    """A configuration that cannot be used: unknown name, unknown key, wrong type."""


def setting(default=None, *, low=None, high=None, above=None, choices=None, factory=None):
    """A config field with its allowed values, checked when the config loads (``low`` and
    ``high`` inclusive, ``above`` exclusive); None passes where the field may be None."""
    metadata = {k: v for k, v in dict(low=low, high=high, above=above, choices=choices).items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class EvalConfig:
    """How a variant is sampled and scored. Seeds and labels are fixed, so every trial of a
    study is scored on the same noise and classes (common random numbers)."""

    num_samples: int = setting(1000, low=10)  # FID of fewer samples means nothing
    batch_size: int = setting(500, low=1)
    steps: int = setting(20, low=1)
    solver: str = setting("euler", choices=("euler", "heun"))
    guidance: float = setting(1.0, low=0.0)  # for stages whose guidance the schedule leaves open
    seed: int = 0
    # Speed switches of the sampler (ppsearch.flow.SolverConfig): bf16 autocast, CUDA graphs
    # (CUDA only; ignored elsewhere), torch.compile. They change the numbers only by rounding.
    bf16: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    # Latent datasets: the VAE that decodes samples and the image folder FID's reference is drawn
    # from (None: those the latents were made with, from their meta.json). The images are read
    # only when the reference statistics are not cached yet.
    vae: str | None = None
    reference_images: str | None = None
    fid: FIDConfig = field(default_factory=FIDConfig)


@dataclass
class TrainerConfig:
    """A training run: from a base (or from scratch), a schedule, data, the loop's settings
    and the evaluation. An exported schedule is a file of this shape."""

    schedule: str = "2x2"
    base: str | None = "embedded"  # checkpoint path, "embedded" (shipped tiny base), or null: from scratch
    model: str = "T/2"  # size (XL/2) or official name (SiT-XL/2, DiT-XL/2), used when training from scratch
    model_name: str | None = None  # official checkpoint name (e.g. SiT-XL/2) when base is one
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = setting(300, low=1)
    batch_size: int = setting(64, low=1)
    lr: float = setting(1e-4, above=0.0)
    weight_decay: float = setting(0.0, low=0.0)
    warmup_steps: int = setting(0, low=0)
    grad_clip: float | None = setting(1.0, above=0.0)
    ema_decay: float = setting(0.999, low=0.0, high=1.0)  # warmed up as min(decay, step / (step + 10)); 0: no EMA
    class_dropout_prob: float = setting(0.1, low=0.0, high=1.0)
    packed: bool = False
    bf16: bool = False  # bf16 autocast; on CUDA, float32 matmuls use TF32 either way
    # No torch.compile for training: each step routes every sample to its stage, so the batch
    # each patch shape sees changes from step to step and a compiled model would recompile. The
    # evaluation's sampler (eval.compile) runs fixed shapes and may compile.
    seed: int = 0
    device: str = "auto"  # auto: cuda when available; cpu, cuda, cuda:N
    threads: int | None = setting(None, low=1)  # CPU threads (None: torch's default)
    # Data-loader processes for datasets read from files (latents): null: the CPUs this run may
    # use (threads, else those Ray reserved for the trial, else the machine's) less one.
    loader_workers: int | None = setting(None, low=0)
    log_every: int = setting(50, low=0)
    checkpoint_every: int = setting(0, low=0)  # 0: only at the end
    keep_train_state: bool = True  # keep the optimiser state at the end (to resume or train on)
    out_dir: str = "runs/train"
    # A folder holding this same training stopped at fewer steps (weights and optimiser state): a
    # new out_dir starts from a copy of it (successive halving's promoted trials; a longer run).
    init_from: str | None = None
    progress: bool = True  # a progress bar on a terminal; elsewhere a line every log_every steps
    eval_every: int = setting(0, low=0)  # FID of the EMA weights every N steps (0: not during training)
    eval_at_end: bool = False  # FID of the final EMA weights (a full training; a trial scores its own)
    # Where the steps run. 0 workers: this process (trials). N >= 1: N Ray Train workers (DDP, one
    # process per GPU with use_gpu) on the Ray cluster at ray_address (null: RAY_ADDRESS if set, else
    # a local one); out_dir must be a folder every worker sees. batch_size is the global batch: each
    # worker takes batch_size / (num_workers x accumulation) samples per micro-step.
    num_workers: int = setting(0, low=0)
    use_gpu: bool = False
    accumulation: int = setting(1, low=1)
    ray_address: str | None = None
    # A full training's settings, put over these by `ppsearch export` (a trial runs without them).
    full_training: dict[str, Any] | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SearchSpaceConfig:
    """Which schedules a search may propose."""

    stage_counts: list[int] = field(default_factory=lambda: [1, 2, 3])
    patch_shapes: list[str] = field(default_factory=lambda: ["2x2", "2x4", "4x2", "4x4", "8x8"])
    boundary_min: float = setting(0.1, above=0.0, high=1.0)  # inner stage boundaries lie on this grid
    boundary_max: float = setting(0.95, above=0.0, high=1.0)
    boundary_step: float = setting(0.05, above=0.0, high=1.0)
    guidance_scales: list[float] = field(default_factory=lambda: [1.0])  # per stage
    pin_last_to_base: bool = True  # the last stage (nearest the data) uses the base patch


@dataclass
class RayConfig:
    """Where trials run. ``address`` null: RAY_ADDRESS if set, else a local Ray started and
    stopped by the command."""

    address: str | None = None
    num_cpus_per_trial: float = setting(1.0, low=0.0)
    num_gpus_per_trial: float = setting(0.0, low=0.0)
    max_concurrent: int | None = setting(None, low=1)  # None: as many as the resources allow
    max_retries: int = setting(2, low=0)  # a worker or node death re-runs the trial this often
    trial_timeout: float | None = setting(None, above=0.0)  # seconds; a trial running longer fails
    # Passed to ray.init: environment variables (PPSEARCH_CACHE, say), pip packages, working_dir.
    runtime_env: dict[str, Any] | None = None


@dataclass
class WarmStartConfig:
    """One variant holding every patch shape of the search space, fine-tuned once per study over
    the whole time axis (each sample's shape drawn among those the space allows at its time) and
    stored with the study; every trial starts from it instead of the base and fine-tunes
    ``trial_steps`` (fewer than ``trainer.steps``, a trial's length from the base)."""

    steps: int = setting(0, low=0)  # fine-tune steps of the warm start; 0: off (trials start from the base)
    trial_steps: int | None = setting(None, low=1)  # a trial's fine-tune steps from it (None: trainer.steps)


@dataclass
class HalvingConfig:
    """Successive halving: trials first run at the lowest of ``rungs`` fidelities (the top rung
    is the trainer's steps and FID samples; each rung below has ``eta`` times fewer of both, FID
    samples no fewer than ``min_samples``); the driver promotes a rung's non-dominated schedules,
    at most one in ``eta`` of the rung's results, to the next rung, resuming their weights."""

    rungs: int = setting(1, low=1)  # 1: off (every trial at the trainer's fidelity)
    eta: int = setting(3, low=2)
    min_samples: int = setting(100, low=10)


@dataclass
class StudyConfig:
    """One search: what it searches, how each trial trains and is scored, where it is stored."""

    name: str = "toy"
    storage: str = "sqlite:///ppsearch.db"  # any SQLAlchemy URL
    sampler: str = setting("tpe", choices=("tpe", "nsga2", "random", "gp", "grid"))
    n_trials: int = setting(12, low=1)  # the trial budget: results (COMPLETE or FAIL), baselines included
    max_gmacs: float | None = setting(None, above=0.0)  # GMACs budget per sample; proposals above it never run
    seed: int = 0
    baselines: bool = True  # run the base, PPF-2 and PPF-3 first
    replicate_base: bool = True  # train the base twice (another seed): the study's training noise
    checkpoint_dir: str = "runs/checkpoints"
    export_dir: str = "exports"
    lease_timeout: float = setting(120.0, above=0.0)  # s without a heartbeat before a driver's lease is stale
    database_retry_seconds: float = setting(600.0, low=0.0)  # how long a failing database write is retried
    on_interrupt: str = setting("cancel", choices=("cancel", "finish"))  # running trials on SIGINT / SIGTERM
    # Delete the weights of trials that are off the front (their record, samples and log stay),
    # where the driver sees checkpoint_dir (a shared filesystem): a 60-trial XL study keeps ~160 GB.
    prune_off_front: bool = False
    # What a worker runs for one trial: f(trainer, schedule_text, out_dir, shared) -> result dict.
    # Benchmarks and tests of the orchestration put a stand-in here.
    trial_function: str = "ppsearch.trial:run_trial"
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    halving: HalvingConfig = field(default_factory=HalvingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def check_ranges(config, where: str, prefix: str = "") -> None:
    """Raise ConfigError naming the first field of ``config`` (a dataclass, checked recursively)
    whose value its ``setting`` does not allow."""
    for f in fields(config):
        value, key = getattr(config, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            check_ranges(value, where, f"{key}.")
            continue
        rules = f.metadata
        if value is None or not rules:
            continue
        bad = (("choices" in rules and value not in rules["choices"])
               or ("low" in rules and value < rules["low"]) or ("high" in rules and value > rules["high"])
               or ("above" in rules and value <= rules["above"]))
        if bad:
            allowed = ("one of " + ", ".join(map(str, rules["choices"]))) if "choices" in rules else " and ".join(
                text for text in (f">= {rules['low']:g}" if "low" in rules else "",
                                  f"> {rules['above']:g}" if "above" in rules else "",
                                  f"<= {rules['high']:g}" if "high" in rules else "") if text)
            raise ConfigError(f"{where}: {key} is {value!r}; it must be {allowed}")


def typed(schema: type[T], data: Any, where: str, overrides: list[str] = ()) -> T:
    """``data`` (a dict or OmegaConf node), then ``key=value`` overrides, checked against the
    dataclass ``schema``: every key of the schema can be overridden, unknown ones fail."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        for op, key, value in _parse_overrides(overrides):
            if op == "delete":
                if OmegaConf.select(OmegaConf.structured(schema), key, default="__missing__") == "__missing__":
                    raise ConfigError(f"{where}: ~{key}: no such key")
                value = OmegaConf.select(OmegaConf.structured(schema), key)
                value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            # merging into a null mapping fails in OmegaConf; replace it instead
            OmegaConf.update(merged, key, value, merge=OmegaConf.select(merged, key) is not None)
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise ConfigError(f"{where}: {message}" + (f" (key '{key}')" if key and key not in message else "")) from None
    check_ranges(config, where)
    return config


_LITERAL_COMMAS = ("schedule",)  # keys whose values hold commas of their own (a schedule's text)


def _parse(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    # The message names the key only: a value may be a database URL with its password.
    key = text.lstrip("+~").partition("=")[0]
    if key.rsplit(".", 1)[-1] in _LITERAL_COMMAS:
        text = _literal_commas(text)
    try:
        return OverridesParser.create().parse_overrides([text])[0]
    except HydraException:
        raise ConfigError(f"bad override of {key!r}: expected key=value, +key=value or ~key "
                          f"(quote a value holding '=' or spaces)") from None


def _parse_overrides(overrides: list[str]) -> list[tuple[str, str, Any]]:
    """Hydra's override grammar as a Hydra user types it: ``key=value``, ``+key=value`` and
    ``++key=value`` set a key, ``~key`` puts it back to its default. A comma list is a sweep,
    which only ``-m`` (multirun) expands; a schedule's commas are its own."""
    parsed = []
    for text in overrides:
        override = _parse(text)
        key = override.key_or_group
        if override.is_sweep_override():
            raise ConfigError(f"{key}={text.partition('=')[2]} is a sweep over several values: add -m "
                              f"(multirun) to launch one study per value")
        if override.package:
            raise ConfigError(f"bad override of {key!r}: packages (@) are not settings")
        parsed.append(("delete", key, None) if override.is_delete() else ("set", key, override.value()))
    return parsed


def sweep(overrides: list[str]) -> list[list[str]]:
    """The override lists of a multirun: one per combination of the sweeps' values, in order."""
    import itertools

    axes = []
    for text in overrides:
        override = _parse(text)
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(combination) for combination in itertools.product(*axes)]


def _literal_commas(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or value[:1] in ("[", "{", "'", '"'):
        return override
    return key + sep + re.sub(r"(?<!\\),", r"\\,", value)


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose(group: str, name_or_path: str, choices: list[str] = ()):
    """Compose ``group/name`` (or a YAML file path) and its defaults into a DictConfig;
    ``choices`` pick other members of the groups it includes (``trainers@trainer=NAME``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    path, search = Path(name_or_path), []
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        # A study file anywhere composes with config groups beside it (a user's own trainers/),
        # then with the shipped ones.
        config_dir, config_name = path.resolve().parent, path.stem
        search = [f"hydra.searchpath=[file://{CONFIG_DIR}]"]
    else:
        if name_or_path not in available(group):
            raise ConfigError(f"unknown {_SINGULAR[group]} {name_or_path!r}; "
                              f"available: {', '.join(available(group)) or 'none'}")
        config_dir, config_name = CONFIG_DIR, f"{group}/{name_or_path}"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return hydra_compose(config_name=config_name, overrides=[*search, *choices])
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise ConfigError(f"bad config {name_or_path}: {str(err).splitlines()[0]}") from None


def load_trainer(name_or_path: str, overrides: list[str] = ()) -> TrainerConfig:
    """A trainer from ``trainers/`` (by name) or an exported YAML file, with overrides."""
    return typed(TrainerConfig, compose("trainers", name_or_path), f"trainer {name_or_path}", overrides)


# ``trainer=NAME`` on the command line picks a member of the trainers group for the study.
_CHOICES = {"trainer": "trainers@trainer", "search_space": "search_spaces@search_space"}


def load_study(name_or_path: str, overrides: list[str] = ()) -> StudyConfig:
    """A study from ``studies/`` (by name) or a YAML file; ``trainer=NAME`` and
    ``search_space=NAME`` swap the composed members, other overrides set values."""
    choices, values = [], []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in _CHOICES:
            choices.append(f"{_CHOICES[key]}={value}")
        else:
            values.append(override)
    return typed(StudyConfig, compose("studies", name_or_path, choices), f"study {name_or_path}", values)


def to_yaml(config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
