"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted CLI args, validated once.

Split by job: ``schema`` (the dataclasses and their docstrings), ``loading`` (YAML, overrides, types),
``validation`` (the rules, by section), ``render`` (``--print-config`` and the hparams), ``resume`` (what may
change on resume, and the warnings), ``schedule`` (the learning-rate schedule), and the declarations the rules
read: ``datasets`` and ``strategies``. The names below are re-exported so ``from dist_cl.config import X`` works.
"""

from dist_cl.config.loading import config_from_dict, load_config, parse_overrides, save_config
from dist_cl.config.render import NOT_HYPERPARAMETERS, changed_keys, describe, field_docs
from dist_cl.config.resume import RESUMABLE_CHANGES, config_differences, epochs_change_warning, resume_warnings
from dist_cl.config.schema import (
    FREE_FORM,
    TOOL_OUTPUTS,
    AugmentConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SelectionConfig,
    TrainConfig,
)
from dist_cl.config.validation import validate

__all__ = [
    "FREE_FORM", "NOT_HYPERPARAMETERS", "RESUMABLE_CHANGES", "TOOL_OUTPUTS", "AugmentConfig", "CheckpointConfig",
    "Config", "ConfigError", "DataConfig", "DistConfig", "EvalConfig", "LossConfig", "ModelConfig", "RunConfig",
    "SelectionConfig", "TrainConfig", "changed_keys", "config_differences", "config_from_dict", "describe",
    "epochs_change_warning", "field_docs", "load_config", "parse_overrides", "resume_warnings", "save_config",
    "validate",
]
