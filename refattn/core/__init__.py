"""What every mechanism shares. Imports nothing else of refattn."""

from .errors import SpecError
from .results import Cotangents, Grads, Result
from .softmax import logsumexp, masked_softmax, merge

__all__ = ["SpecError", "Result", "Grads", "Cotangents", "masked_softmax", "logsumexp", "merge"]
