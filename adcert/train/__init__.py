"""The trainer: configs, schedules, batch-norm statistics, checkpoints, evaluation, the loop.

    adcert train --config configs/mnist_0.1_ibp.yaml [--set train.epochs=5 ...] [--resume]
    adcert train --config FILE --overwrite          # replace the run already in output_dir

or from Python::

    from adcert.train import Trainer, load_config
    record = Trainer(load_config("configs/digits_pgd_teacher.yaml")).fit()
"""
from adcert.train.checkpoint import (
    CheckpointError, atomic_save, load_checkpoint, model_from_checkpoint,
)
from adcert.train.config import Config, ConfigError, from_dict, load_config
from adcert.train.evaluate import evaluate
from adcert.train.schedules import coef_at, eps_at, smooth_ramp
from adcert.train.trainer import (
    RECORD_FIELDS, MetricsLogError, Trainer, l1_term, read_metrics, train,
)

__all__ = ["Config", "ConfigError", "load_config", "from_dict", "Trainer", "train",
           "RECORD_FIELDS", "CheckpointError", "atomic_save", "load_checkpoint",
           "model_from_checkpoint", "evaluate", "eps_at", "coef_at", "smooth_ramp", "l1_term",
           "MetricsLogError", "read_metrics"]
