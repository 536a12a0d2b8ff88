"""ppsearch: search PPFlow patch schedules for a pretrained DiT/SiT.

The public surface; modules whose names start with ``_`` are private.
"""
from .checkpoint import CheckpointError, load_base, save_model
from .flops import forward_macs, relative_cost, sample_cost, train_step_macs
from .flow import SamplerConfig, flow_loss, sample, train_step
from .models import PPFlow_models, PPFlowConfig, PPFlowDiT, ppflow_variant
from .schedule import PatchShape, Schedule, ScheduleError, Stage

__all__ = [
    "CheckpointError", "load_base", "save_model",
    "forward_macs", "relative_cost", "sample_cost", "train_step_macs",
    "SamplerConfig", "flow_loss", "sample", "train_step",
    "PPFlow_models", "PPFlowConfig", "PPFlowDiT", "ppflow_variant",
    "PatchShape", "Schedule", "ScheduleError", "Stage",
]

from .query import QueryError, export_trial, front, pick_trial, trials
from .store import Store, StoreError, TrialRecord

__all__ += ["QueryError", "export_trial", "front", "pick_trial", "trials", "Store", "StoreError", "TrialRecord"]
