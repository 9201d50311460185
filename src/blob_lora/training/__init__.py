"""Training: settings, KL schedules, optimisers, checkpoints and the Accelerate loop."""

from blob_lora.training.config import TrainConfig
from blob_lora.training.kl_schedule import KLSchedule, make_schedule

__all__ = ["KLSchedule", "TrainConfig", "make_schedule"]
