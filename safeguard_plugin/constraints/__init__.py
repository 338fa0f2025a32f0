"""Built-in constraints. Each module holds one config class and one constraint class."""

from .base import (
    BatchView,
    CalibrationContext,
    Constraint,
    ConstraintConfig,
    Runtime,
    TrainContext,
    TrainingSetup,
)

__all__ = ["BatchView", "CalibrationContext", "Constraint", "ConstraintConfig", "Runtime", "TrainContext",
           "TrainingSetup"]
