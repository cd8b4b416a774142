"""The parts of training that tests drive one by one (batches, batch norm, a step), with
``train`` itself, in one namespace: ``from tests.training import parts as T``."""

from deepdark.model.nets import model_input
from deepdark.training import TrainConfig, open_library, split_nights, train
from deepdark.training.batchnorm import calibrate_batchnorm, init_output_level, set_training_mode, track_running_stats
from deepdark.training.data import SampleSource, build_batch
from deepdark.training.loop import _train_step

__all__ = [
    "SampleSource",
    "TrainConfig",
    "_train_step",
    "build_batch",
    "calibrate_batchnorm",
    "init_output_level",
    "model_input",
    "open_library",
    "set_training_mode",
    "split_nights",
    "track_running_stats",
    "train",
]
