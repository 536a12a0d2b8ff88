"""Typed configuration: Hydra config groups (``trainers/``, ``search_spaces/``, ``studies/``,
shipped inside the package under ``ppsearch/conf``) composed with command-line overrides and
checked against dataclasses, so a typo fails at start with the key's name."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .data import DataConfig
from .fid import FIDConfig

CONFIG_DIR = Path(__file__).parent / "conf"
_SINGULAR = {"trainers": "trainer", "search_spaces": "search space", "studies": "study"}
T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown name, unknown key, wrong type."""


@dataclass
class EvalConfig:
    """How a variant is sampled and scored. Seeds and labels are fixed, so every trial of a
    study is scored on the same noise and classes (common random numbers)."""

    num_samples: int = 1000
    batch_size: int = 500
    steps: int = 20
    solver: str = "euler"
    guidance: float = 1.0  # for stages whose guidance the schedule leaves open
    seed: int = 0
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
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999  # warmed up as min(decay, step / (step + 10)); 0: no EMA
    class_dropout_prob: float = 0.1
    packed: bool = False
    bf16: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    threads: int | None = None  # CPU threads (None: torch's default)
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    out_dir: str = "runs/train"
    progress: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SearchSpaceConfig:
    """Which schedules a search may propose."""

    stage_counts: list[int] = field(default_factory=lambda: [1, 2, 3])
    patch_shapes: list[str] = field(default_factory=lambda: ["2x2", "2x4", "4x2", "4x4", "8x8"])
    boundary_min: float = 0.1  # inner stage boundaries lie on this grid
    boundary_max: float = 0.95
    boundary_step: float = 0.05
    guidance_scales: list[float] = field(default_factory=lambda: [1.0])  # per stage
    pin_last_to_base: bool = True  # the last stage (nearest the data) uses the base patch


@dataclass
class RayConfig:
    """Where trials run. ``address`` null: RAY_ADDRESS if set, else a local Ray started and
    stopped by the command."""

    address: str | None = None
    num_cpus_per_trial: float = 1.0
    num_gpus_per_trial: float = 0.0
    max_concurrent: int | None = None  # None: as many as the resources allow
    max_retries: int = 2  # a worker or node death re-runs the trial this often


@dataclass
class StudyConfig:
    """One search: what it searches, how each trial trains and is scored, where it is stored."""

    name: str = "toy"
    storage: str = "sqlite:///ppsearch.db"  # any SQLAlchemy URL
    sampler: str = "tpe"  # tpe | nsga2 | random | gp
    n_trials: int = 12  # the trial budget, baselines included
    max_gmacs: float | None = None  # GMACs budget per sample; proposals above it never run
    seed: int = 0
    baselines: bool = True  # enqueue the base, PPF-2 and PPF-3 first
    checkpoint_dir: str = "runs/checkpoints"
    export_dir: str = "exports"
    # What a worker runs for one trial: f(trainer, schedule_text, out_dir) -> result dict.
    # Benchmarks and tests of the orchestration put a stand-in here.
    trial_function: str = "ppsearch.trial:run_trial"
    ray: RayConfig = field(default_factory=RayConfig)
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def typed(schema: type[T], data: Any, where: str, overrides: list[str] = ()) -> T:
    """``data`` (a dict or OmegaConf node), then ``key=value`` overrides, checked against the
    dataclass ``schema``: every key of the schema can be overridden, unknown ones fail."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        for key, value in _parse_overrides(overrides):
            OmegaConf.update(merged, key, value, merge=True)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).splitlines()[0]
        raise ConfigError(f"{where}: {message}" + (f" (key '{key}')" if key and key not in message else "")) from None


def _parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Hydra's override grammar, ``key=value`` only; ppsearch has no sweeps, so a comma in a
    plain value (a schedule's text) is literal."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parsed = []
    for text in overrides:
        # The message names the key only: a value may be a database URL with its password.
        key = text.partition("=")[0]
        try:
            override = OverridesParser.create().parse_overrides([_literal_commas(text)])[0]
        except HydraException:
            raise ConfigError(f"bad override of {key!r}: expected key=value (quote a value holding '=' or spaces)") from None
        if override.is_delete() or override.is_add() or override.is_sweep_override() or override.package:
            raise ConfigError(f"bad override of {key!r}: expected key=value")
        parsed.append((override.key_or_group, override.value()))
    return parsed


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

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        config_dir, config_name = path.resolve().parent, path.stem
    else:
        if name_or_path not in available(group):
            raise ConfigError(f"unknown {_SINGULAR[group]} {name_or_path!r}; "
                              f"available: {', '.join(available(group)) or 'none'}")
        config_dir, config_name = CONFIG_DIR, f"{group}/{name_or_path}"
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            return hydra_compose(config_name=config_name, overrides=list(choices))
    except (HydraException, OmegaConfBaseException) as err:
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
