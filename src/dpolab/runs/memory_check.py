"""A buffer that cannot fit in this machine's memory is refused before any work, with the options that
size it, rather than ending in an allocation traceback (numpy's or torch's) after the run folder exists."""

from __future__ import annotations

import os

from dpolab.errors import ConfigError


def physical_memory() -> int | None:
    """Bytes of physical memory, or ``None`` where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_memory(nbytes: float, what: str) -> None:
    """Refuse ``nbytes`` of buffers (``what`` names them and the options that size them) above the
    machine's physical memory."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise ConfigError(f"{what} would take {nbytes / 2**30:,.1f} GiB, more than this machine's "
                          f"{total / 2**30:,.1f} GiB of memory")
