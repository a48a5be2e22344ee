"""What stands in for a cffi `dlopen`ed C library: real `cffi.FFI` instances whose function pointers call Python.

`EmulatedLib(ffi, cdef_text, impls)` exposes, as attributes, every function of `cdef_text` that has an
implementation, as a real C function pointer of the declared type (`ffi.callback`): cffi converts and checks the
arguments exactly as for a library function (an int where a pointer is declared is a TypeError, a negative
number for an unsigned parameter an OverflowError, a list for `const char *` a temporary array). A declared
function without an implementation raises AttributeError on access, as a symbol missing from the `.so` does;
enum constants of the cdef are attributes too. The functions are instance attributes, so a test may delete one
(a runtime without that symbol) or replace it. An exception raised inside an implementation (CoherenceError,
ContractError) is carried across the C boundary and raised again to the caller.

`CountingFFI` is a `cffi.FFI` whose `memmove` adds the bytes it copies to `memory.copied`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import cffi

from ._memory import memory

# "RET NAME(ARGS);" of a cdef: RET may be `const AX_CHAR*` or `uint64_t`
_PROTOTYPE = re.compile(r"^\s*((?:const\s+)?[A-Za-z_]\w*\s*\**)\s*([A-Za-z_]\w*)\s*\(([^;]*)\)\s*;", re.MULTILINE)
_ENUM = re.compile(r"\}\s*([A-Za-z_]\w*)\s*;")


class CountingFFI(cffi.FFI):
    """A cffi.FFI whose memmove counts the bytes it copies into `memory.copied`."""

    def memmove(self, dest: Any, src: Any, n: int) -> None:
        memory.copied += int(n)
        super().memmove(dest, src, n)


def prototypes(cdef_text: str) -> dict[str, str]:
    """name -> the function's C type ("RET(ARGS)") for every function declared in `cdef_text`."""
    return {name: f"{ret.strip()}({args.strip()})" for ret, name, args in _PROTOTYPE.findall(cdef_text)}


def enum_constants(ffi: cffi.FFI, cdef_text: str) -> dict[str, int]:
    """Every enumerator of the typedef'd enums of `cdef_text`, by name."""
    consts: dict[str, int] = {}
    for type_name in _ENUM.findall(cdef_text):
        ctype = ffi.typeof(type_name)
        if ctype.kind == "enum":
            consts.update(ctype.relements)
    return consts


class EmulatedLib:
    """The functions of a cdef, implemented in Python behind real C function pointers."""

    def __init__(self, name: str, ffi: cffi.FFI, cdef_text: str, impls: dict[str, Callable[..., Any]]) -> None:
        self._name = name
        self._consts = enum_constants(ffi, cdef_text)
        self._pending = threading.local()
        declared = prototypes(cdef_text)
        unknown = set(impls) - set(declared)
        if unknown:
            raise TypeError(f"{name}: implementations of undeclared functions {sorted(unknown)}")
        for fname, impl in impls.items():  # instance attributes, as a cffi lib caches what it has looked up
            setattr(self, fname, self._bind(ffi, fname, declared[fname], impl))

    def _bind(self, ffi: cffi.FFI, fname: str, ctype: str, impl: Callable[..., Any]) -> Callable[..., Any]:
        result, args = ctype.split("(", 1)
        result_kind = ffi.typeof(f"{result}(*)({args}").result.kind
        failed: Any = ffi.NULL if result_kind == "pointer" else (None if result_kind == "void" else -1)
        pending = self._pending

        def trampoline(*args: Any) -> Any:
            try:
                return impl(*args)
            except BaseException as exc:  # carried across the C frame, raised again in `call`
                pending.exc = exc
                return failed

        pointer = ffi.callback(ctype, trampoline)

        def call(*args: Any) -> Any:
            pending.exc = None
            result = pointer(*args)
            exc, pending.exc = pending.exc, None
            if exc is not None:
                raise exc
            return result

        call.__name__ = call.__qualname__ = fname
        call._pointer = pointer  # type: ignore[attr-defined]  # keeps the callback alive
        return call

    def __getattr__(self, attr: str) -> Any:  # what is not an instance attribute: an enum constant, or missing
        consts = self.__dict__.get("_consts", {})
        if attr in consts:
            return consts[attr]
        raise AttributeError(f"function/symbol '{attr}' not found in library '{self.__dict__.get('_name')}'")

    def __dir__(self) -> list[str]:
        return sorted(n for n in self.__dict__ if not n.startswith("_")) + sorted(self._consts)

    def __repr__(self) -> str:
        return f"<emulated cffi library {self._name!r}>"
