"""refattn: the golden oracle for attention mechanisms built for long sequences."""

from .core import Grads, Result, SpecError, merge
from .core.registry import get as get_mechanism
from .core.registry import names as mechanisms
from .conformance.verify import verify
from .dense import dense_attention, dense_attention_vjp
from . import dilution, lsh, position, routing
from . import lowrank
from . import segmented
from . import memory
from . import hierarchical

__version__ = "0.1.0"

__all__ = [
    "SpecError",
    "Result",
    "Grads",
    "merge",
    "dense_attention",
    "dense_attention_vjp",
    "position",
    "dilution",
    "lsh",
    "routing",
    "lowrank",
    "segmented",
    "memory",
    "hierarchical",
    "verify",
    "get_mechanism",
    "mechanisms",
    "__version__",
]
