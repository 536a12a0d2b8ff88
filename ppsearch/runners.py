"""Where the driver's trials run. A runner starts trials of ``trial_function(trainer, schedule,
out_dir, shared)`` and reports when they finish; the driver owns everything else.

- :class:`RayRunner`: Ray tasks on a cluster (``ray.address``) or on a local Ray started here.
  Before the first trial it checks that one trial fits on at least one node and probes a worker
  (device, checkpoint folder); the base and the FID reference statistics go into the object
  store once; a trial over ``ray.trial_timeout`` is cancelled.
- :class:`InlineRunner`: trials in the driver's process, finishing in submission order: a
  deterministic study for replays against a table of known results, and for debugging.
"""
from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from .config import ConfigError, StudyConfig


class WorkerLost(Exception):
    """A trial's worker or node died (the driver retries the trial)."""


def trial_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"trial_function {path!r} is not an importable module:function") from None


@dataclass
class Shared:
    """What the driver loaded once and every trial reads: the base model and the FID reference
    statistics. On Ray each is an object-store reference, fetched once per worker process."""

    refs: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str):
        value = self.refs.get(key)
        if value is None or not _is_object_ref(value):
            return value
        if value.hex() not in _fetched:
            import ray

            _fetched.clear()  # one study's inputs at a time per worker
            _fetched[value.hex()] = ray.get(value)
        return _fetched[value.hex()]


_fetched: dict[str, Any] = {}


def _is_object_ref(value) -> bool:
    try:
        import ray

        return isinstance(value, ray.ObjectRef)
    except ImportError:
        return False


def probe(trainer, checkpoint_dir: str, need_bytes: int) -> str | None:
    """On a worker, what would make every trial fail: the device missing, the checkpoint folder
    not writable or too full for one trial's files. None when all is well."""
    from .train import TrainError, resolve_device

    try:
        resolve_device(trainer.device)
    except (TrainError, RuntimeError) as err:
        return f"trainer.device {trainer.device!r} on worker {os.uname().nodename}: {err}"
    folder = Path(checkpoint_dir)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"checkpoint_dir {folder} is under {existing}, which is a file"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        test = folder / f".ppsearch-write-test-{os.getpid()}"
        test.write_bytes(b"ok")
        test.unlink()
    except OSError as err:
        return f"checkpoint_dir {folder} is not writable on worker {os.uname().nodename}: {err.strerror or err}"
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        return (f"checkpoint_dir {folder} has {free / 2**30:.2f} GiB free on worker {os.uname().nodename}; one "
                f"trial writes about {need_bytes / 2**30:.2f} GiB")
    return None


class TrialRunner(Protocol):
    """``start`` says how many trials run at once; ``submit`` starts one (of ``function``
    instead of the trial function: the warm start) and returns a handle;
    ``wait`` gives the handles that finished (at least one unless ``timeout`` s pass);
    ``result`` returns a finished trial's result or raises its error (WorkerLost when its worker
    died); ``cancel`` stops a running one; ``close`` lets go of the resources."""

    def start(self) -> int: ...
    def share(self, values: dict) -> Shared: ...
    def probe(self, trainer, checkpoint_dir: str, need_bytes: int) -> str | None: ...
    def submit(self, trainer, schedule: str, out_dir: str, shared: Shared, function: Callable | None = None): ...
    def wait(self, handles: list, timeout: float) -> list: ...
    def result(self, handle) -> dict: ...
    def cancel(self, handle, force: bool) -> None: ...
    def close(self): ...


def node_capacity(nodes: list[dict], cpus: float, gpus: float) -> tuple[int, list[str]]:
    """Trials that fit at once on ``nodes`` (ray.nodes() entries) at ``cpus`` and ``gpus`` each,
    and a warning for each node that leaves GPUs or CPUs idle because of the ratio asked."""
    slots, warnings = 0, []
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        by_cpu = int(have.get("CPU", 0) // cpus) if cpus else None
        by_gpu = int(have.get("GPU", 0) // gpus) if gpus else None
        fits = min(v for v in (by_cpu, by_gpu) if v is not None) if (by_cpu, by_gpu) != (None, None) else 1
        slots += fits
        name = node.get("NodeManagerAddress", "?")
        if by_cpu is not None and by_gpu is not None and by_gpu > by_cpu:
            warnings.append(f"node {name}: {(by_gpu - by_cpu) * gpus:g} of {have.get('GPU', 0):g} GPUs stay idle: "
                            f"each trial asks {cpus:g} CPUs and the node has {have.get('CPU', 0):g} "
                            f"(lower ray.num_cpus_per_trial)")
        elif by_cpu is not None and by_gpu is not None and by_cpu > by_gpu and gpus:
            idle = have.get("CPU", 0) - by_gpu * cpus
            if idle >= cpus:
                warnings.append(f"node {name}: {idle:g} CPUs stay idle: each trial asks {gpus:g} GPU(s) and the "
                                f"node has {have.get('GPU', 0):g} (raise ray.num_cpus_per_trial to use them)")
    return slots, warnings


def _quiet_token_notice() -> None:
    """Ray tells every ``ray.init`` of a local cluster that token authentication is on (the
    default since Ray 2.5x); ppsearch starts one per launch, so the notice would be repeated on
    every launch. Authentication stays as Ray sets it; only that notice is dropped."""
    import logging

    class NoTokenNotice(logging.Filter):
        def filter(self, record):
            return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, NoTokenNotice) for f in log.filters):
        log.addFilter(NoTokenNotice())


class RayRunner:
    """Trials as Ray tasks on a cluster (``ray.address``) or on a local one started here."""

    def __init__(self, config: StudyConfig, log: Callable[[str], None] = print):
        self.config, self.log, self.function = config, log, trial_function(config.trial_function)

    def start(self) -> int:
        import ray

        config = self.config.ray
        self.address = config.address or os.environ.get("RAY_ADDRESS")
        options = dict(ignore_reinit_error=True, log_to_driver=False, runtime_env=config.runtime_env or None)
        _quiet_token_notice()
        try:
            if self.address:
                ray.init(address=self.address, **options)
            else:
                ray.init(include_dashboard=False, configure_logging=False, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"cannot reach Ray at {self.address}: {str(err).splitlines()[0]}") from None
        cpus, gpus = config.num_cpus_per_trial, config.num_gpus_per_trial
        slots, warnings = node_capacity(ray.nodes(), cpus, gpus)
        if slots == 0:
            largest = max((n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", True)),
                          key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
            self.close()
            raise ConfigError(f"a trial asks {cpus:g} CPUs and {gpus:g} GPUs (ray.num_cpus_per_trial, "
                              f"ray.num_gpus_per_trial) but no node of the Ray cluster has them; the largest has "
                              f"{largest.get('CPU', 0):g} CPUs and {largest.get('GPU', 0):g} GPUs")
        for line in warnings:
            self.log(f"warning: {line}")
        # max_calls=0 keeps workers alive between trials, so each fetches the shared inputs once.
        # Ray does not retry: the driver does, so that it knows and records each attempt.
        self.remote = self._remote(self.function)
        self.prober = ray.remote(probe).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        return min(slots, config.max_concurrent or slots)

    def _remote(self, function):
        import ray

        config = self.config.ray
        return ray.remote(max_calls=0, max_retries=0)(function).options(num_cpus=config.num_cpus_per_trial,
                                                                         num_gpus=config.num_gpus_per_trial)

    def share(self, values: dict) -> Shared:
        import ray

        return Shared({key: ray.put(value) for key, value in values.items() if value is not None})

    def probe(self, trainer, checkpoint_dir: str, need_bytes: int) -> str | None:
        import ray

        return ray.get(self.prober.remote(trainer, checkpoint_dir, need_bytes))

    def submit(self, trainer, schedule, out_dir, shared, function=None):
        remote = self.remote if function is None else self._remote(function)
        return remote.remote(trainer, schedule, out_dir, shared)

    def wait(self, handles, timeout):
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout)[0]

    def result(self, handle):
        import ray
        from ray.exceptions import NodeDiedError, ObjectLostError, OwnerDiedError, WorkerCrashedError

        try:
            return ray.get(handle)
        except (WorkerCrashedError, NodeDiedError, ObjectLostError, OwnerDiedError) as err:
            raise WorkerLost(f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")

    def cancel(self, handle, force):
        import ray

        ray.cancel(handle, force=force)

    def close(self):
        import ray

        if not self.address:
            ray.shutdown()


class InlineRunner:
    """Trials run in the driver's process when submitted, ``slots`` of them pending at a time
    and finishing in the order they were submitted."""

    def __init__(self, function, slots: int = 1):
        self.function, self.slots, self.outcomes, self.count = function, slots, {}, 0

    def start(self):
        return self.slots

    def share(self, values):
        return Shared(dict(values))

    def probe(self, trainer, checkpoint_dir, need_bytes):
        return None

    def submit(self, trainer, schedule, out_dir, shared, function=None):
        self.count += 1
        try:
            self.outcomes[self.count] = ((function or self.function)(trainer, schedule, out_dir, shared), None)
        except Exception as err:  # told as the trial's failure, as a Ray task's would be
            self.outcomes[self.count] = (None, err)
        return self.count

    def wait(self, handles, timeout):
        return [min(handles)]

    def result(self, handle):
        result, error = self.outcomes.pop(handle)
        if error is not None:
            raise error
        return result

    def cancel(self, handle, force):
        self.outcomes.pop(handle, None)

    def close(self):
        pass

