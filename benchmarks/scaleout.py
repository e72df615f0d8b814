"""Scale-out benchmark: DFTopK over a selection axis sharded across JAX devices.

Placeholder module header; the benchmark itself follows below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Collective", "collectives"]

_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
    "reduce-scatter",
)
# "= <shape or (tuple of shapes)> <op>(" or "<op>-start(" in optimised HLO text
_LINE = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|\S+)\s+(?P<op>" + "|".join(_OPS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(pred|bf16|[suf]\d+|c\d+)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


@dataclass(frozen=True)
class Collective:
    """One collective of a compiled HLO module: its op and result arrays."""

    op: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the result (for ``-start`` ops: of the last array, the result)."""
        total = 0
        for dtype, shape in self.arrays:
            size = 1
            for s in shape:
                size *= s
            total += size * _BYTES.get(dtype, max(1, int(re.sub(r"\D", "", dtype) or 8) // 8))
        return total


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of an HLO module's text (``compiled.as_text()``).

    Examples
    --------
    >>> line = "%p = s32[4,256]{1,0} all-reduce(%b), channel_id=1, to_apply=%r"
    >>> [(c.op, c.arrays, c.nbytes) for c in collectives(line)]
    [('all-reduce', (('s32', (4, 256)),), 4096)]
    """
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.search(line)
        if m is None:
            continue
        arrays = tuple(
            (dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _ARRAY.findall(m.group("shape"))
        )
        if m.group("start") and len(arrays) > 1:
            arrays = arrays[-1:]  # async start: (operand..., result)
        out.append(Collective(m.group("op"), arrays))
    return out
