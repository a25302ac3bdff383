"""PFL methods. Importing this package registers every method."""

from .base import METHODS, ClientTrainer, ClientUpdate, LocalContext, Method, Phase, TrainStats, register
from . import (  # noqa: F401  (registers)
    apfl, attention, ditto, fedavg, fedavg_ft, fedbabu, fedbn, fedper, fedperfix, fedrep, local, partial, perfedavg,
    pfedhn,
)

__all__ = ["METHODS", "ClientTrainer", "ClientUpdate", "LocalContext", "Method", "Phase", "TrainStats", "register"]
