"""What a request will cost in memory and time, checked before anything is allocated or started.

Sizes in the inputs (tokens, batches, GPUs, experts, layers, the shape in a ``.npy`` header, a command-line
flag) multiply into arrays and loops. Each layer estimates the big arrays and the long loops it is about to
build from those sizes alone and calls :func:`require_memory` / :func:`require_time` first, so a size that
cannot fit fails within a second, as one line that gives the estimate, instead of a MemoryError minutes
later or a run that never ends.

The memory limit is ``MOESIM_MAX_MEMORY_GB`` when set (raise it to go past what the machine reports, lower
it to keep headroom for other work); else the memory available now (``MemAvailable`` of /proc/meminfo, else
the physical memory os.sysconf reports, else 16 GB). Either way it is never more than the address space
that ``RLIMIT_AS`` leaves this process. The time limit is ``MOESIM_MAX_HOURS`` hours (default 24).

Deliberately rough: estimates count the big arrays and inner loops, at the bytes and the seconds a typical
machine spends on them, to tell a possible request from an impossible one, not to predict its cost.
"""

from __future__ import annotations

import os

from moesim.errors import InputError

MEMORY_ENV = "MOESIM_MAX_MEMORY_GB"
HOURS_ENV = "MOESIM_MAX_HOURS"
DEFAULT_HOURS = 24.0
_FALLBACK_BYTES = 16e9


def _env_number(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise InputError(f"must be a positive number, got {raw!r}", source=f"environment variable {name}")
    return value


def _available_bytes() -> float:
    """Memory available to a new allocation now: /proc/meminfo's MemAvailable, else physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return _FALLBACK_BYTES


def _address_space_left() -> float:
    """Bytes of address space ``RLIMIT_AS`` still allows this process (infinite when unlimited)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return float("inf")
        with open("/proc/self/statm") as fh:
            used = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        return float(max(soft - used, 0))
    except (ImportError, OSError, ValueError, IndexError):
        return float("inf")


def memory_limit() -> tuple[float, str]:
    """(bytes a request may use, where that limit comes from)."""
    asked = _env_number(MEMORY_ENV)
    limit, why = (asked * 1e9, MEMORY_ENV) if asked is not None else (_available_bytes(), "memory available")
    left = _address_space_left()
    if left < limit:
        return left, "address space left by RLIMIT_AS"
    return limit, why


def gb(nbytes: float) -> str:
    """``nbytes`` in words: '3.2 GB', '1.1e+06 GB'."""
    value = nbytes / 1e9
    return f"{value:.3g} GB" if value < 1e5 else f"{value:.2g} GB"


def require_memory(nbytes: float, what: str, *, source: str | None = None, field: str | None = None) -> None:
    """Raise InputError when ``what`` (its sizes in words, e.g. '64 tokens x 4 layers x top-2 ids') would
    need more than the memory limit."""
    if nbytes <= 1e8:  # below 100 MB: not worth a look at /proc
        return
    nbytes = float(min(nbytes, 1e300))  # sizes are Python ints: a product of absurd ones can pass any float
    limit, why = memory_limit()
    if nbytes > limit:
        raise InputError(f"{what} needs about {gb(nbytes)} of memory, over the {gb(limit)} limit ({why}; set "
                         f"{MEMORY_ENV} to change it)", source=source, field=field)


def require_time(seconds: float, what: str, *, source: str | None = None, field: str | None = None) -> None:
    """Raise InputError when ``what`` would take longer than the time limit (``MOESIM_MAX_HOURS``)."""
    hours = _env_number(HOURS_ENV) or DEFAULT_HOURS
    seconds = float(min(seconds, 1e300))
    if seconds > hours * 3600:
        estimate = f"{seconds / 3600:.3g} hours" if seconds < 3.6e8 else f"{seconds / 3.15e7:.2g} years"
        raise InputError(f"{what} would take about {estimate}, over the {hours:g}-hour limit (set {HOURS_ENV} "
                         "to change it)", source=source, field=field)
