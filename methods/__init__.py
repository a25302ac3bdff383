"""PFL methods. Importing this package registers every method."""

from .base import METHODS, ClientUpdate, LocalContext, Method, TrainStats, register
from . import fedavg, fedbn, fedper, fedperfix, fedrep, local, partial  # noqa: F401  (registers)

__all__ = ["METHODS", "ClientUpdate", "LocalContext", "Method", "TrainStats", "register"]
