"""The AXCL runtime's enums, as pyaxengine's `axengine._axclrt_types`."""

from __future__ import annotations

from enum import Enum


class VNPUType(Enum):
    DISABLED = 0
    ENABLED = 1
    BIG_LITTLE = 2
    LITTLE_BIG = 3


class ModelType(Enum):
    SINGLE = 0
    DUAL = 1
    TRIPLE = 2
