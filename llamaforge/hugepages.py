"""Model weights on 2 MB pages (Linux transparent huge pages), for faster CPU decoding.

Decoding streams every weight from memory once a token. On 4 KB pages that is a TLB miss every 4 KB, and the CPU's
hardware prefetchers stop at each page boundary; on 2 MB pages a weight streams without either. Measured on this
project's 2-core machine (benchmarks/hugepages.py: same process, alternating, TinyLlama-1.1B shape, three runs):
decode steps in bfloat16 -4% to +11% faster, int8 +3% to +5%, int4 within 2% (docs/benchmarks.md).

torch puts its CPU allocations of 2 MB and more on huge pages when THP_MEM_ALLOC_ENABLE=1, a variable it reads once,
when it first allocates (on `import torch`). `import llamaforge` sets it when torch is not imported yet; where torch
came first, `load()` says once how to get it. This module imports nothing heavy: llamaforge/__init__.py runs it first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

VARIABLE = "THP_MEM_ALLOC_ENABLE"
SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this kernel gives huge pages to memory that asks for them (its setting is "always" or "madvise")."""
    try:
        return "[never]" not in SETTING.read_text()
    except OSError:  # not Linux, or a kernel without transparent huge pages
        return False


def request() -> None:
    """Ask torch for huge pages (THP_MEM_ALLOC_ENABLE=1) if it has not allocated yet; a user's own value stays."""
    if "torch" not in sys.modules and available():
        os.environ.setdefault(VARIABLE, "1")


# Run when llamaforge is first imported (llamaforge/__init__.py): torch reads the variable once, at import.
request()
REQUESTED = os.environ.get(VARIABLE) == "1"


def in_effect() -> bool:
    """Whether torch's large CPU allocations in this process are on huge pages."""
    return REQUESTED and available()


def advice() -> str | None:
    """One line on how to get huge pages, where this process does not have them and could; else None."""
    if in_effect() or not available():
        return None
    return (f"model weights are on 4 KB pages (torch was imported before llamaforge): import llamaforge first, or "
            f"set {VARIABLE}=1 before starting Python, for a few percent faster CPU decoding")
