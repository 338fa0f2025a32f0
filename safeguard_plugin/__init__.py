"""safeguard-plugin: keep safety alignment intact while fine-tuning.

Data flows one way: ``calibrate`` -> :class:`Artifact` -> constraint -> loss term / after-step edit -> metrics.
"""

__version__ = "0.1.0"

from .artifacts import Artifact, ArtifactError  # noqa: E402
from .config import SafeguardConfig, load_config  # noqa: E402
from .constraints.base import Constraint, ConstraintConfig  # noqa: E402
from .engine import SafeguardEngine  # noqa: E402
from .registry import available_constraints, get_constraint, register_constraint  # noqa: E402

__all__ = [
    "Artifact",
    "ArtifactError",
    "Constraint",
    "ConstraintConfig",
    "SafeguardConfig",
    "SafeguardEngine",
    "available_constraints",
    "get_constraint",
    "load_config",
    "register_constraint",
    "__version__",
]
