"""The OpenMP runtime that torch (and llamaforge's C kernels, which link the same libgomp) run CPU work on.

libgomp gives every thread that starts a parallel region its own pool of worker threads, kept until that
thread exits. Once it manages more threads than there are CPUs, it stops spinning between parallel regions
and parks its workers on a futex instead, so every region pays a wake-up: a batch-1 int4 linear measured 20 us
from the one thread that runs the model and 70-90 us once a second thread (the one that loaded the model)
also held a pool. `release_thread_pool` lets the loading thread give its pool back.
"""

from __future__ import annotations

import ctypes
import functools
import os

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: end the threads, keep nothing the next region cannot rebuild


@functools.cache
def libgomp() -> ctypes.CDLL | None:
    """The libgomp.so.1 this process already loaded (torch's own copy), or None.

    Found by its soname, as the dynamic linker binds the kernels to it: other wheels bring libgomp copies
    under mangled names (sentencepiece's `libgomp-6a29c32d.so.1.0.0`), each with pools of its own.
    """
    try:
        library = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
    except (OSError, AttributeError):  # not loaded (torch on another runtime), or no RTLD_NOLOAD on this OS
        return None
    return library if hasattr(library, "omp_pause_resource_all") else None  # OpenMP 5.0 (GCC 9 and later)


def release_thread_pool() -> bool:
    """End the calling thread's OpenMP worker threads (its next parallel region starts new ones).

    Call it on a thread that is done with parallel work while another thread runs the model: the model's
    thread is then the only one libgomp manages, and it keeps spinning between regions. True if a pool was
    released; False where torch runs on another OpenMP runtime, or none was loaded yet.
    """
    library = libgomp()
    return library is not None and library.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
