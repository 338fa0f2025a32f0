"""Built-in constraints. Each module holds one config class and one constraint class."""

from .base import BatchView, Constraint, ConstraintConfig, TrainContext

__all__ = ["BatchView", "Constraint", "ConstraintConfig", "TrainContext"]
