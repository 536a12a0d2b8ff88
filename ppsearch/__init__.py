"""ppsearch: search PPFlow patch schedules for a pretrained DiT/SiT.

The public surface. Names load on first use, so ``import ppsearch.models`` stays light (no
Optuna, SQLAlchemy or pandas) on a bare GPU node and the command starts fast.
"""
import importlib

_EXPORTS = {
    "checkpoint": ["CheckpointError", "load_base", "save_model"],
    "config": ["StudyConfig", "TrainerConfig", "load_study", "load_trainer"],
    "errors": ["PPSearchError"],
    "data": ["DataConfig", "load_dataset"],
    "fid": ["FID", "FIDConfig", "FIDResult"],
    "flops": ["forward_macs", "relative_cost", "sample_cost", "train_step_macs"],
    "flow": ["SolverConfig", "flow_loss", "sample", "train_step"],
    "models": ["PPFlow_models", "PPFlowConfig", "PPFlowDiT", "ppflow_variant"],
    "query": ["QueryError", "export_trial", "front", "open_study", "pick_trial", "trials"],
    "schedule": ["PatchShape", "Schedule", "ScheduleError", "Stage"],
    "store": ["Store", "StoreError"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ppsearch' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
