"""Memory sizes as the design document writes them: an integer of bytes or "2048MiB", "4GiB", "1.5GB"."""

from __future__ import annotations

import re

UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
         "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string with a decimal (KB, MB, GB) or binary (KiB, MiB, GiB) unit.

    Raises:
        ValueError: the string is not a number followed by one of the units.
    """
    if isinstance(value, bool):
        raise ValueError("a memory size must be an integer of bytes or a string like '4GiB'")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            number, unit = match.groups()
            return int(float(number) * UNITS[unit.upper()])
    raise ValueError(f"invalid memory size {value!r}: use bytes or a number with one of "
                     "B, KB, MB, GB, KiB, MiB, GiB (e.g. '2048MiB', '4GiB', '1.5GB')")
