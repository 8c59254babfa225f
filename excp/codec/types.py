"""What a codec stage hands to the container: JSON metadata plus raw byte streams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Encoded:
    """One coded unit. ``meta`` is small and JSON-serialisable; each stream is a flat
    uint8 tensor (on any device) that the container entropy-codes in chunks."""

    meta: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)
