"""The AXE runtime's enums, as pyaxengine's `axengine._axe_types`."""

from __future__ import annotations

from enum import Enum


class VNPUType(Enum):
    DISABLED = 0
    ENABLED = 1
    BIG_LITTLE = 2
    LITTLE_BIG = 3


class ModelType(Enum):
    HALF = 0  # MC20E (AX630C, AX620Q)
    FULL = 1  # MC20E
    SINGLE = 0  # MC50 (AX650A, AX650N) and M57H
    DUAL = 1  # MC50
    TRIPLE = 2  # MC50


class ChipType(Enum):
    MC20E = 0
    MC50 = 1
    M57H = 2
