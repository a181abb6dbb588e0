"""moesim.budget: the memory and time limits (MOESIM_MAX_MEMORY_GB, MOESIM_MAX_HOURS), where each comes from, and
the one-line refusals that name the estimate, the limit and the variable that changes it."""

from __future__ import annotations

import io
import os

import pytest

from moesim import budget
from moesim.budget import gb, memory_limit, require_memory, require_time
from moesim.errors import InputError


@pytest.fixture(autouse=True)
def _no_limits_set(monkeypatch):
    monkeypatch.delenv(budget.MEMORY_ENV, raising=False)
    monkeypatch.delenv(budget.HOURS_ENV, raising=False)


def _rlimit(monkeypatch, soft: int) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))


def _statm_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(("nbytes", "text"), [(3.2e9, "3.2 GB"), (123456789, "0.123 GB"), (5e13, "5e+04 GB"),
                                              (1.1e15, "1.1e+06 GB"), (0, "0 GB")])
def test_gb_writes_three_figures_then_two_in_exponent_form(nbytes, text):
    assert gb(nbytes) == text


@pytest.mark.parametrize("raw", ["0", "-2", "abc", "nan", "inf", "1e400"])
def test_a_limit_that_is_not_a_positive_number_is_refused(monkeypatch, raw):
    monkeypatch.setenv(budget.MEMORY_ENV, raw)
    with pytest.raises(InputError) as err:
        memory_limit()
    assert str(err.value) == f"environment variable MOESIM_MAX_MEMORY_GB: must be a positive number, got {raw!r}"
    monkeypatch.setenv(budget.HOURS_ENV, raw)
    with pytest.raises(InputError, match=r"^environment variable MOESIM_MAX_HOURS: must be a positive number"):
        require_time(1, "anything")


@pytest.mark.parametrize("raw", ["", "   "])
def test_an_empty_limit_counts_as_unset(monkeypatch, raw):
    monkeypatch.setenv(budget.HOURS_ENV, raw)
    require_time(23.9 * 3600, "a sweep")  # the default 24 hours
    with pytest.raises(InputError, match="over the 24-hour limit"):
        require_time(24.1 * 3600, "a sweep")


def test_memory_limit_from_the_environment(monkeypatch):
    _rlimit(monkeypatch, __import__("resource").RLIM_INFINITY)
    monkeypatch.setenv(budget.MEMORY_ENV, " 2.5 ")
    assert memory_limit() == (2.5e9, "MOESIM_MAX_MEMORY_GB")


def test_require_memory_refuses_over_the_limit_in_one_line(monkeypatch):
    monkeypatch.setenv(budget.MEMORY_ENV, "0.5")
    require_memory(0.5e9, "exactly the limit")
    with pytest.raises(InputError) as err:
        require_memory(2e9, "64 tokens x 4 layers x top-2 ids", source="t.npz", field="experts")
    assert str(err.value) == ("t.npz: experts: 64 tokens x 4 layers x top-2 ids needs about 2 GB of memory, over the "
                              "0.5 GB limit (MOESIM_MAX_MEMORY_GB; set MOESIM_MAX_MEMORY_GB to change it)")
    assert (err.value.source, err.value.field) == ("t.npz", "experts")


def test_require_memory_never_looks_below_100_mb(monkeypatch):
    monkeypatch.setattr(budget, "memory_limit", lambda: pytest.fail("looked up the limit for a small request"))
    require_memory(1e8, "100 MB")


def test_absurd_sizes_are_refused_not_overflowed(monkeypatch):
    monkeypatch.setenv(budget.MEMORY_ENV, "1")
    with pytest.raises(InputError, match=r"needs about 1e\+291 GB of memory, over the 1 GB limit"):
        require_memory(10**400, "a product of absurd sizes")
    with pytest.raises(InputError, match=r"would take about 3.2e\+292 years, over the 24-hour limit"):
        require_time(10**400, "an absurd loop")


def test_address_space_caps_the_limit(monkeypatch):
    monkeypatch.setenv(budget.MEMORY_ENV, "1000")
    soft = _statm_bytes() + 3 * 10**9
    _rlimit(monkeypatch, soft)
    used = _statm_bytes()
    limit, why = memory_limit()
    assert why == "address space left by RLIMIT_AS"
    assert abs(limit - (soft - used)) < 64e6  # what the process maps moves a little between the two reads
    with pytest.raises(InputError, match=r"over the [\d.]+ GB limit \(address space left by RLIMIT_AS; set "
                                         "MOESIM_MAX_MEMORY_GB to change it\\)"):
        require_memory(4e9, "an array")


def test_address_space_already_spent_leaves_nothing(monkeypatch):
    _rlimit(monkeypatch, 4096)  # below what the process already maps
    assert memory_limit() == (0.0, "address space left by RLIMIT_AS")
    with pytest.raises(InputError, match=r"needs about 0.2 GB of memory, over the 0 GB limit"):
        require_memory(2e8, "an array")


def test_a_lower_environment_limit_wins_over_the_address_space(monkeypatch):
    monkeypatch.setenv(budget.MEMORY_ENV, "1")
    _rlimit(monkeypatch, _statm_bytes() + 50 * 10**9)
    assert memory_limit() == (1e9, "MOESIM_MAX_MEMORY_GB")


def test_unreadable_rlimit_counts_as_unlimited(monkeypatch):
    import resource

    def fail(which):
        raise OSError("no rlimits here")

    monkeypatch.setattr(resource, "getrlimit", fail)
    assert budget._address_space_left() == float("inf")


def _fake_open(text: str | None):
    def fake(path, *args, **kwargs):
        assert path == "/proc/meminfo"
        if text is None:
            raise FileNotFoundError(path)
        return io.StringIO(text)

    return fake


def test_available_memory_is_meminfos_memavailable(monkeypatch):
    monkeypatch.setattr(budget, "open", _fake_open("MemTotal:  100 kB\nMemFree:  7 kB\nMemAvailable:  2048 kB\n"),
                        raising=False)
    assert budget._available_bytes() == 2048 * 1024
    _rlimit(monkeypatch, __import__("resource").RLIM_INFINITY)
    assert memory_limit() == (2048 * 1024, "memory available")


@pytest.mark.parametrize("meminfo", [None, "MemTotal: 100 kB\n", "MemAvailable: lots\n"])
def test_without_memavailable_the_physical_memory_counts(monkeypatch, meminfo):
    """No /proc (not Linux), a kernel older than MemAvailable, a line that does not parse."""
    monkeypatch.setattr(budget, "open", _fake_open(meminfo), raising=False)
    assert budget._available_bytes() == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_without_proc_or_sysconf_the_fallback_is_16_gb(monkeypatch):
    def no_sysconf(name):
        raise ValueError(f"unrecognized configuration name {name}")

    monkeypatch.setattr(budget, "open", _fake_open(None), raising=False)
    monkeypatch.setattr(budget.os, "sysconf", no_sysconf)
    assert budget._available_bytes() == 16e9


def test_require_time_within_and_over_the_limit(monkeypatch):
    require_time(24 * 3600, "a day exactly")
    with pytest.raises(InputError) as err:
        require_time(48 * 3600, "10^6 points x 2 reps", source="s.yaml", field="sweep")
    assert str(err.value) == ("s.yaml: sweep: 10^6 points x 2 reps would take about 48 hours, over the 24-hour limit "
                              "(set MOESIM_MAX_HOURS to change it)")
    monkeypatch.setenv(budget.HOURS_ENV, "0.5")
    require_time(1800, "half an hour")
    with pytest.raises(InputError, match=r"^a loop would take about 0.503 hours, over the 0.5-hour limit"):
        require_time(1811, "a loop")
    with pytest.raises(InputError, match=r"would take about 32 years, over the 0.5-hour limit"):
        require_time(1e9, "a long loop")
