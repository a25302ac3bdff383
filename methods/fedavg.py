"""FedAvg: the base behaviour of `Method`, registered under its name."""

from __future__ import annotations

from .base import Method, register


@register("fedavg")
class FedAvg(Method):
    """FedAvg (McMahan et al., 2017): one global model, the sample-weighted mean of client updates."""
