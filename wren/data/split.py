"""The held-out validation split: a pure function of each row's own text."""

from __future__ import annotations

import hashlib

_TWO_TO_64 = float(2**64)


def is_validation(raw_line: str, val_fraction: float) -> bool:
    """True when this row belongs to the validation set.

    The rule: take the row's JSON line with surrounding whitespace stripped, hash its UTF-8 bytes
    with SHA-256, read the first 8 bytes of the digest as a big-endian unsigned integer h; the row
    is held out iff h / 2**64 < val_fraction.

    It depends on nothing but the line, so the split is the same whatever the file order, however
    rows are spread over files, and on every machine; identical lines land on the same side.
    """
    if val_fraction <= 0.0:
        return False
    digest = hashlib.sha256(raw_line.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / _TWO_TO_64 < val_fraction
