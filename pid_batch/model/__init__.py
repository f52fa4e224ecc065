"""The PiD network in pure torch (no ray, no storage) and its text encoder.

Also the FLOP count and the demo autoencoder. The math: docs/model.md#network.
"""

from __future__ import annotations

from typing import Any

from pid_batch.config import NetConfig
from pid_batch.model.pid_net import LQProjection, PidNet, SigmaGate


def build_net(kwargs: dict[str, Any]) -> PidNet:
    """Build a `PidNet` from official (effective_)constructor_kwargs."""
    return PidNet(NetConfig.from_kwargs(kwargs))


__all__ = ["LQProjection", "NetConfig", "PidNet", "SigmaGate", "build_net"]
