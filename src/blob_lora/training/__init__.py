"""Training: settings, KL schedules, optimisers, checkpoints, the Accelerate loop and the run
folder it writes (``run_dir``) and re-opens (``saved_run``)."""

from blob_lora.training.config import TrainConfig
from blob_lora.training.kl_schedule import KLSchedule, make_schedule

__all__ = ["KLSchedule", "TrainConfig", "make_schedule"]
