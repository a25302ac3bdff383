"""PFL methods. Importing this package registers every method."""

from .base import METHODS, ClientTrainer, ClientUpdate, LocalContext, Method, Phase, TrainStats, register
from . import fedavg, fedavg_ft, fedbn, fedper, fedperfix, fedrep, local, partial, pfedhn  # noqa: F401  (registers)

__all__ = ["METHODS", "ClientTrainer", "ClientUpdate", "LocalContext", "Method", "Phase", "TrainStats", "register"]
