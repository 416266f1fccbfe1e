"""Training: the run configuration, the two-stage trainer (mask search, then subnetwork tuning), the
epoch loop, precision, evaluation, and the results it writes."""
from vpns_fast.training.trainer import TrainConfig, TwoStageTrainer, resume

__all__ = ["TrainConfig", "TwoStageTrainer", "resume"]
