"""Human-readable figures for the plan table and the report (one formatting, both places)."""

from __future__ import annotations


def si(value: float | None, unit: str) -> str:
    """1234567 FLOP -> "1.23 MFLOP"; None -> "-"."""
    if value is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def binary_bytes(value: float | None) -> str:
    """Byte counts in KiB/MiB/GiB; None -> "-"."""
    if value is None:
        return "-"
    for factor, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value:.0f} B"


def duration(seconds: float | None) -> str:
    """Seconds as s/ms/us/ns; None -> "-"."""
    if seconds is None:
        return "-"
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= factor:
            return f"{seconds / factor:.2f} {unit}"
    return f"{seconds * 1e9:.0f} ns"
