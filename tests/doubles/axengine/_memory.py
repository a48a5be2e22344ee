"""The NPU memory the double emulates: the AXE board's cached CMM and the AXCL card's device memory, with stats.

AXE board (`CmmPool`): CMM memory is cached on the CPU side and the NPU is not cache-coherent. Each allocation has
a HOST view (a real allocation: its address is `pVirAddr`, so cffi memmove/buffer on it write real memory) and a
DEVICE copy (what DRAM holds for the NPU) at a fake physical address; both start as 0xFF bytes (0xFFFF is a
bf16 NaN). `flush` copies host -> device for exactly the range given, `invalidate` device -> host; both check that
phy and vir name the same allocation at the same offset and that the range fits (CoherenceError otherwise: the
real call would touch the wrong memory). A snapshot of the host bytes as of their last flush/invalidate lets a run
check, over only the ranges it reads, that every byte the CPU wrote since was flushed (`check_clean`).

AXCL card (`DevicePool`): device memory is reachable only through axclrtMemcpy. Device pointers are integers from
0x4000_0000_0000_0000 upwards (no host pointer can have them), each allocation backed by a numpy byte array
(0xFF). `memcpy` checks the kind against the pointers and counts bytes per kind; `free` of anything but the start
of a live allocation is refused and recorded in `memory.errors`.

`memory` holds the counters (bytes copied by memmove, flushed, invalidated, h2d, d2h, d2d, h2h; runs) and
`errors`; `calls` and `sessions` are the package's run and session logs. Phy and device ranges are never reused.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Every run of a model on the emulated NPU, for tests that check what ran: (model file name, shape group).
calls: list[tuple[str, int]] = []
# Every session created: (model file name, the providers it resolved to as [(name, options)]).
sessions: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []


class CoherenceError(AssertionError):
    """CPU and NPU views of CMM memory used in a way that the real board would get wrong."""


class MemoryStats:
    """Bytes moved through the emulated memory, runs, and errors that are reported as status codes."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.copied = 0  # engine_cffi/sys_cffi/axclrt_cffi .memmove
        self.flushed = 0  # AX_SYS_MflushCache
        self.invalidated = 0  # AX_SYS_MinvalidateCache
        self.h2d = 0
        self.d2h = 0
        self.d2d = 0
        self.h2h = 0
        self.runs = 0  # RunSyncV2, RunGroupIOSync, axclrtEngineExecute that ran a graph
        self.errors: list[str] = []

    def snapshot(self) -> dict[str, Any]:
        """The counters and errors as they are now, as a dict."""
        return {k: list(v) if isinstance(v, list) else v for k, v in vars(self).items()}

    def __repr__(self) -> str:
        return f"MemoryStats({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


memory = MemoryStats()

_PAGE = 4096


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


@dataclass(eq=False)
class CmmBlock:
    """One AX_SYS_MemAllocCached allocation: host view, device copy, and the host bytes as last synced."""

    phy: int
    size: int
    host: np.ndarray  # uint8, the CPU's (cached) view; host.ctypes.data is pVirAddr
    device: np.ndarray  # uint8, what DRAM holds for the NPU
    synced: np.ndarray  # uint8, host bytes as of their last flush or invalidate
    owner: Any = field(default=None, repr=False)  # the raw host allocation (host is an aligned view of it)

    @property
    def vir(self) -> int:
        return int(self.host.ctypes.data)


class CmmPool:
    """The board's CMM: cached allocations with separate CPU and NPU views."""

    def __init__(self, base: int = 0x1_0000_0000) -> None:
        self._next_phy = base
        self._phys: list[int] = []  # sorted starts of live blocks
        self._by_phy: dict[int, CmmBlock] = {}
        self._virs: list[int] = []
        self._by_vir: dict[int, CmmBlock] = {}
        self._gone: list[tuple[int, int]] = []  # (phy, size) of blocks freed or released, in phy order

    def alloc(self, size: int, align: int) -> CmmBlock:
        align = max(_PAGE, align)
        if size <= 0 or align & (align - 1):
            raise ValueError(f"CMM allocation of {size} bytes aligned to {align}")
        phy = _round_up(self._next_phy, align)
        self._next_phy = _round_up(phy + size, _PAGE) + _PAGE  # a guard page: ranges never touch or overlap
        raw = np.empty(size + align, np.uint8)
        start = (-int(raw.ctypes.data)) % align
        host = raw[start : start + size]
        host.fill(0xFF)
        block = CmmBlock(phy, size, host, np.full(size, 0xFF, np.uint8), host.copy(), raw)
        bisect.insort(self._phys, phy)
        self._by_phy[phy] = block
        bisect.insort(self._virs, block.vir)
        self._by_vir[block.vir] = block
        return block

    def free(self, phy: int, vir: int) -> bool:
        block = self._by_phy.get(phy)
        if block is None or block.vir != vir:
            return False
        self._drop(block)
        return True

    def release(self, phys: list[int]) -> None:
        """Forget blocks whose session is gone (the real pyaxengine never frees them: reclaimed at process exit)."""
        for phy in phys:
            block = self._by_phy.get(phy)
            if block is not None:
                self._drop(block)

    def gone(self, phy: int) -> str:
        """' (a block that was freed, or released with its session)' where phy was in one, else ''."""
        i = bisect.bisect_right(self._gone, (phy, 1 << 64)) - 1
        if i >= 0 and self._gone[i][0] <= phy < sum(self._gone[i]):
            return " (a block that was freed, or released with its session)"
        return ""

    def _drop(self, block: CmmBlock) -> None:
        bisect.insort(self._gone, (block.phy, block.size))
        del self._by_phy[block.phy]
        self._phys.remove(block.phy)
        del self._by_vir[block.vir]
        self._virs.remove(block.vir)

    def at_phy(self, phy: int) -> tuple[CmmBlock, int] | None:
        """The live block holding physical address `phy`, and phy's offset in it."""
        i = bisect.bisect_right(self._phys, phy) - 1
        if i < 0:
            return None
        block = self._by_phy[self._phys[i]]
        offset = phy - block.phy
        return (block, offset) if offset < block.size else None

    def at_vir(self, vir: int) -> tuple[CmmBlock, int] | None:
        i = bisect.bisect_right(self._virs, vir) - 1
        if i < 0:
            return None
        block = self._by_vir[self._virs[i]]
        offset = vir - block.vir
        return (block, offset) if offset < block.size else None

    def _range(self, call: str, phy: int, vir: int, size: int) -> tuple[CmmBlock, int]:
        found = self.at_phy(phy)
        if found is None:
            where = self.at_vir(vir)
            hint = f" (vir 0x{vir:x} is offset {where[1]} of the block at phy 0x{where[0].phy:x})" if where else ""
            raise CoherenceError(f"{call}: phy 0x{phy:x} is in no CMM allocation{self.gone(phy)}{hint}")
        block, offset = found
        if vir != block.vir + offset:
            where = self.at_vir(vir)
            says = f"offset {where[1]} of the block at phy 0x{where[0].phy:x}" if where else "no CMM allocation"
            raise CoherenceError(
                f"{call}: phy 0x{phy:x} is offset {offset} of the block at phy 0x{block.phy:x}, but vir 0x{vir:x} "
                f"is {says}: phy and vir must name the same bytes"
            )
        if size <= 0 or offset + size > block.size:
            raise CoherenceError(
                f"{call}: {size} bytes from offset {offset} run past the end of the {block.size}-byte block at "
                f"phy 0x{block.phy:x}"
            )
        return block, offset

    def flush(self, phy: int, vir: int, size: int) -> None:
        """AX_SYS_MflushCache: the CPU's bytes of exactly this range reach DRAM."""
        block, offset = self._range("AX_SYS_MflushCache", phy, vir, size)
        end = offset + size
        block.device[offset:end] = block.host[offset:end]
        block.synced[offset:end] = block.host[offset:end]
        memory.flushed += size

    def invalidate(self, phy: int, vir: int, size: int) -> None:
        """AX_SYS_MinvalidateCache: the CPU sees DRAM's bytes of this range (its unflushed writes there are lost)."""
        block, offset = self._range("AX_SYS_MinvalidateCache", phy, vir, size)
        end = offset + size
        block.host[offset:end] = block.device[offset:end]
        block.synced[offset:end] = block.device[offset:end]
        memory.invalidated += size

    def device_range(self, phy: int, size: int) -> tuple[CmmBlock, int] | None:
        """The block and offset of an NPU access of `size` bytes at `phy`; None if it leaves live memory."""
        found = self.at_phy(phy)
        if found is None or found[1] + size > found[0].size:
            return None
        return found

    @staticmethod
    def check_clean(block: CmmBlock, offset: int, size: int, model: str, name: str) -> None:
        """CoherenceError unless every host byte of the range is as last flushed (or invalidated)."""
        host, synced = block.host[offset : offset + size], block.synced[offset : offset + size]
        words = np.uint64 if offset % 8 == 0 and size % 8 == 0 else np.uint8  # 8 bytes a compare where it can
        if (host.view(words) == synced.view(words)).all():
            return
        dirty = np.flatnonzero(host != synced)
        raise CoherenceError(
            f"{model}: input {name} reads {size} bytes at phy 0x{block.phy + offset:x} whose CPU writes were not "
            f"flushed (AX_SYS_MflushCache): {dirty.size} dirty bytes, first at offset {int(dirty[0])}, last at "
            f"offset {int(dirty[-1])}; the NPU would read stale DRAM"
        )


DEVICE_BASE = 0x4000_0000_0000_0000


@dataclass(eq=False)
class DeviceBlock:
    """One axclrtMalloc allocation on the card."""

    addr: int
    size: int
    device: int  # the device id it was allocated on
    data: np.ndarray  # uint8


class DevicePool:
    """The AXCL card's memory: fake device addresses backed by numpy byte arrays."""

    def __init__(self) -> None:
        self._next = DEVICE_BASE
        self._starts: list[int] = []
        self._blocks: dict[int, DeviceBlock] = {}

    @staticmethod
    def is_device(addr: int) -> bool:
        return addr >= DEVICE_BASE

    def alloc(self, size: int, device: int) -> DeviceBlock:
        addr = self._next
        self._next = _round_up(addr + size, _PAGE) + _PAGE
        block = DeviceBlock(addr, size, device, np.full(size, 0xFF, np.uint8))
        bisect.insort(self._starts, addr)
        self._blocks[addr] = block
        return block

    def free(self, addr: int) -> bool:
        block = self._blocks.pop(addr, None)
        if block is None:
            return False
        self._starts.remove(addr)
        return True

    def find(self, addr: int, size: int) -> tuple[DeviceBlock, int] | None:
        """The live block and offset of `size` bytes at device address `addr`; None if they leave it."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        block = self._blocks[self._starts[i]]
        offset = addr - block.addr
        if offset >= block.size or offset + size > block.size:
            return None
        return block, offset

    def block_at(self, addr: int) -> DeviceBlock | None:
        return self._blocks.get(addr)


cmm = CmmPool()
device_memory = DevicePool()
