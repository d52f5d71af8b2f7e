"""Token counts as written on the command line and in reports: `2048`, `2k` (k = 1024), `1k,4k,16k`.

Torch-free, so the CLI checks these flags before anything heavy is imported.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LENGTH_RE = re.compile(r"(\d+)([kK]?)")


def parse_lengths(text: str | Sequence[int | str] | None) -> list[int]:
    """ "1k,4k,16k" (k = 1024) or a list of ints/strings → [1024, 4096, 16384]; None → []."""
    if text is None:
        return []
    parts = (text if isinstance(text, str) else ",".join(map(str, text))).split(",")
    out = []
    for part in parts:
        m = LENGTH_RE.fullmatch(str(part).strip())
        if m is None or int(m.group(1)) == 0:
            raise ValueError(f"bad length {part!r}: use a positive token count like 2048 or 2k (k = 1024)")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    return out


def length_label(n: int) -> str:
    """1024 → "1k", 1000 → "1000": the inverse of `parse_lengths` for display."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)
