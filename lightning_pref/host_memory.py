"""Host memory kept by the process while a Trainer runs, instead of handed back to the kernel and faulted in again.

glibc's ``malloc`` gives each block above its mmap threshold (128 KiB, rising with the blocks freed up to
32 MiB) a mapping of its own and unmaps it when the block is freed, and hands the free top of its heap back to the
kernel once it passes the trim threshold. A training step frees and allocates the same large tensors every step:
activations, the gradients that ``zero_grad`` dropped, the LM head's ``(V, H)`` weight gradient (113 MB on
SmolLM2). So every step mapped them anew, and the kernel zero-filled each of their 4 KiB pages on first touch.
On SmolLM2 DPO (short HH rows, one CPU thread) that was 55 to 78 thousand page faults a step, 7 µs each on this
project's machine: autograd's out-of-place sum of the tied embedding's and the head's gradients (a new 113 MB
tensor) took 0.19 s, and 8 ms once freed pages were kept.

:class:`HostMemory` (always on, ``--host_memory.keep_freed``) sets glibc's ``M_MMAP_MAX`` to 0 and its
``M_TRIM_THRESHOLD`` to 2 GiB while the Trainer runs, so freed blocks stay in the heap and the next step reuses
them: no page faults after the first steps. The peak resident set is that of the same blocks
(``benchmarks/real_vs_trl.py`` records it); what changes is that the process does not shrink between steps. At
teardown it restores glibc's defaults and returns the free heap (``malloc_trim``), for a process that goes on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Any

from lightning.pytorch import Callback

from lightning_pref.errors import UserInputError

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_MMAP_MAX = 65536
DEFAULT_TRIM_THRESHOLD = 128 * 1024
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt's value is an int: a free heap top above 2 GiB still goes back


def glibc() -> Any | None:
    """This process's C library if it is glibc (the one with ``mallopt`` and these parameters), else ``None``."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class HostMemory(Callback):
    """Keeps freed host memory in the process while the Trainer runs (glibc), so a step's large tensors reuse the
    last step's pages instead of faulting in new ones (module docstring: what it measured).

    Args:
        keep_freed: ``None`` (default): where the C library is glibc; ``True``: required (refused elsewhere);
            ``False``: ``malloc`` as it is.
    """

    def __init__(self, keep_freed: bool | None = None) -> None:
        self.keep_freed = keep_freed
        self._libc: Any | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.keep_freed is False or self._libc is not None:
            return
        libc = glibc()
        if libc is None:
            if self.keep_freed:
                raise UserInputError(
                    f"--host_memory.keep_freed true needs glibc's malloc, and this system's C library is "
                    f"{platform.libc_ver()[0] or platform.system()}: leave it unset (or false)")
            return
        if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)):
            self._restore(libc)
            if self.keep_freed:
                raise UserInputError("--host_memory.keep_freed true: glibc's mallopt refused M_MMAP_MAX or "
                                     "M_TRIM_THRESHOLD: leave it unset (or false)")
            return
        self._libc = libc

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._libc is not None:
            self._restore(self._libc)
            self._libc = None

    @staticmethod
    def _restore(libc: Any) -> None:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
