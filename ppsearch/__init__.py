"""ppsearch: search PPFlow patch schedules for a pretrained DiT/SiT.

The public surface; everything else is an implementation detail of the command.
"""
from .checkpoint import CheckpointError, load_base, save_model
from .config import StudyConfig, TrainerConfig, load_study, load_trainer
from .data import DataConfig, load_dataset
from .fid import FID, FIDConfig, FIDResult
from .flops import forward_macs, relative_cost, sample_cost, train_step_macs
from .flow import SamplerConfig, flow_loss, sample, train_step
from .models import PPFlow_models, PPFlowConfig, PPFlowDiT, ppflow_variant
from .query import QueryError, export_trial, front, pick_trial, trials
from .schedule import PatchShape, Schedule, ScheduleError, Stage
from .store import Store, StoreError, TrialRecord

__all__ = [
    "CheckpointError", "load_base", "save_model",
    "StudyConfig", "TrainerConfig", "load_study", "load_trainer",
    "DataConfig", "load_dataset", "FID", "FIDConfig", "FIDResult",
    "forward_macs", "relative_cost", "sample_cost", "train_step_macs",
    "SamplerConfig", "flow_loss", "sample", "train_step",
    "PPFlow_models", "PPFlowConfig", "PPFlowDiT", "ppflow_variant",
    "QueryError", "export_trial", "front", "pick_trial", "trials",
    "PatchShape", "Schedule", "ScheduleError", "Stage",
    "Store", "StoreError", "TrialRecord",
]
