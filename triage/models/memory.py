"""Giving freed heap memory back to the operating system between studies.

PyTorch's CPU tensors of a different size for every series leave freed blocks in glibc's heap,
which glibc keeps for reuse rather than returning them: passing 40 cached 256 px studies (each also
mirrored) through the slice network grew the process's anonymous memory from 169 MB to 1,253 MB;
with :func:`release_heap` after each study it stayed at 223 MB (session 13). Over a training set of
640 studies the growth reached about 7 GB. Training and tuning call it per study. Inference in the
worker does not need it: 24 predictions of 24-48 slice series level off at 1.40-1.47 GB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None  # glibc only (not musl, macOS)


def release_heap() -> bool:
    """``malloc_trim(0)``: return the heap's free pages to the OS. False where the C library has no
    such call (then nothing is done)."""
    lib = _libc()
    if lib is None:
        return False
    lib.malloc_trim(0)
    return True
