"""``--conformance-report=PATH``: a per-backend Markdown summary of a run.

Tests record measurements through the ``conformance_record`` fixture
(``conformance_record("forward_err", value, lib=..., dtype=...)``); this plugin
also counts passed/failed/skipped tests per backend (from the ``lib``
parameter, or from the file name for framework-specific files such as
``test_torch.py``) and writes one table row per backend when the session ends.
"""

from __future__ import annotations

import math
import platform
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

__all__ = ["ConformanceReport", "METRICS", "backend_of", "failure_summary"]


def _worst(old: float, new: float) -> float:
    """The larger error, NaN above everything (``max`` keeps whichever NaN argument
    comes first, so an earlier finite value could hide a NaN).

    Examples
    --------
    >>> _worst(1e-3, float("nan")), _worst(float("nan"), 1e-3), _worst(1e-6, 1e-3)
    (nan, nan, 0.001)
    """
    if math.isnan(old) or math.isnan(new):
        return math.nan
    return max(old, new)


#: measurement kinds and how repeated values combine (errors: worst; scaling: last)
METRICS = {
    "forward_err": _worst,
    "grad_err": _worst,
    "scaling_fwd": lambda old, new: new,
    "scaling_fwd_bwd": lambda old, new: new,
}

# framework-specific test files and the backend they exercise
_FILE_BACKEND = re.compile(r"test_(torch|jax|cupy|numpy|array_api_strict)\b")
SHARED = "(backend-independent)"


def backend_of(item: pytest.Item) -> str:
    """The backend a collected test exercises (its ``lib`` parameter or its file)."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "lib" in callspec.params:
        return str(callspec.params["lib"])
    m = _FILE_BACKEND.search(Path(str(item.path)).stem)
    return m.group(1) if m else SHARED


# lines of a NumPy assertion message that list entries or arrays
_LISTING = re.compile(r"\[|(x|y|ACTUAL|DESIRED): ")


def failure_summary(message: str, limit: int = 240) -> str:
    """One line saying why a test failed, from pytest's crash message.

    The first line alone is often empty of content: a NumPy assertion's first
    line is just ``AssertionError:``, and the tolerance, the ``err_msg`` and the
    mismatch count follow.  So a first line that is only an exception name is
    joined with the next informative lines (up to three).

    Examples
    --------
    >>> failure_summary("AssertionError: \\nNot equal to tolerance rtol=0, atol=1e-06\\n\\n"
    ...                 "Mismatched elements: 2 / 5 (40%)\\n x: array([1, 2])")
    'AssertionError: Not equal to tolerance rtol=0, atol=1e-06; Mismatched elements: 2 / 5 (40%)'
    >>> failure_summary("ValueError: k must be >= 0\\nmore")
    'ValueError: k must be >= 0'
    """
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return "(no message)"
    head, rest = lines[0], lines[1:]
    if re.fullmatch(r"[\w.]+:?", head) and rest:
        # only the exception name: the content is on the next lines; NumPy's
        # per-index listings and printed arrays say less than its counts
        body = [ln for ln in rest if not (_LISTING.match(ln) or ln.endswith(":"))]
        body = body[:3] or rest[:1]
        head = f"{head.rstrip(':')}: {'; '.join(body)}"
    return head if len(head) <= limit else head[: limit - 3] + "..."


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.2g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.3g}"


class ConformanceReport:
    """Pytest plugin object collecting outcomes and measurements."""

    def __init__(
        self, path: str | Path, args: list[str] | None = None, *, autowrite: bool = True
    ) -> None:
        self.path = Path(path)
        self.args = list(args or [])
        #: write the file when the session ends (the runner writes it itself, later)
        self.autowrite = autowrite
        self.backend: dict[str, str] = {}
        self.counts: dict[str, dict[str, int]] = defaultdict(
            lambda: {"passed": 0, "failed": 0, "skipped": 0}
        )
        # (backend, metric) -> {dtype or "": value}
        self.metrics: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
        self.notes: dict[str, list[str]] = defaultdict(list)
        # backend -> {skip reason: count}; failures as (backend, test id, message)
        self.skip_reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.failures: list[tuple[str, str, str]] = []
        #: lines under the title (set by the runner: library, versions, command)
        self.meta: list[str] = []
        #: extra ``(title, lines)`` sections after the table (e.g. the mutation proof)
        self.sections: list[tuple[str, list[str]]] = []

    # ----------------------------------------------------------- recording
    def record(self, kind: str, value: float, lib: str, dtype: str = "") -> None:
        if kind not in METRICS:
            raise ValueError(f"kind must be one of {sorted(METRICS)}, got {kind!r}")
        slot = self.metrics[(lib, kind)]
        value = float(value)
        slot[dtype] = METRICS[kind](slot[dtype], value) if dtype in slot else value

    def note(self, lib: str, text: str) -> None:
        if text not in self.notes[lib]:
            self.notes[lib].append(text)

    # ------------------------------------------------------------- hooks
    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            self.backend[item.nodeid] = backend_of(item)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        lib = self.backend.get(report.nodeid, SHARED)
        if report.failed:
            self.counts[lib]["failed"] += 1
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            self.failures.append((lib, report.nodeid, failure_summary(message)))
        elif report.skipped and report.when in ("setup", "call"):
            self.counts[lib]["skipped"] += 1
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skip_reasons[lib][reason.removeprefix("Skipped: ")] += 1
        elif report.passed and report.when == "call":
            self.counts[lib]["passed"] += 1

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.autowrite:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(self.markdown(), encoding="utf-8")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.autowrite:
            terminalreporter.write_line(f"conformance report written to {self.path}")

    # ------------------------------------------------------------ output
    def _cell(self, lib: str, kind: str) -> str:
        vals = self.metrics.get((lib, kind))
        if not vals:
            return "-"
        return ", ".join(
            f"{d}: {_fmt(v)}" if d else _fmt(v)
            for d, v in sorted(vals.items(), key=lambda kv: kv[0])
        )

    def markdown(self) -> str:
        libs = sorted(
            {lib for lib in self.counts} | {lib for lib, _ in self.metrics},
            key=lambda s: (s == SHARED, s),
        )
        lines = ["# topk-core conformance report", ""]
        if self.meta:
            lines += [*self.meta, ""]
        args = f"; pytest args: `{' '.join(self.args)}`" if self.args else ""
        lines += [
            f"Python {platform.python_version()} on {platform.machine()} "
            f"({platform.system()}){args}",
            "",
            "| backend | forward max abs err | gradient max abs err | scaling exponent fwd "
            "| scaling exponent fwd+bwd | passed | failed | skipped |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for lib in libs:
            c = self.counts[lib]
            lines.append(
                f"| {lib} | {self._cell(lib, 'forward_err')} | {self._cell(lib, 'grad_err')} "
                f"| {self._cell(lib, 'scaling_fwd')} | {self._cell(lib, 'scaling_fwd_bwd')} "
                f"| {c['passed']} | {c['failed']} | {c['skipped']} |"
            )
        lines += [
            "",
            "Errors: max |value - float64 reference| over the contract battery, per dtype "
            "(gradients: VJP w.r.t. x). Scaling exponent: log-log slope of the time "
            "normalised by an elementwise op of the same library, plus 1 (1.0 = linear).",
        ]
        notes = [(lib, t) for lib in libs for t in self.notes.get(lib, [])]
        if notes:
            lines += ["", "Notes:", ""] + [f"- {lib}: {t}" for lib, t in notes]
        skips = [(lib, r, n) for lib in libs for r, n in sorted(self.skip_reasons[lib].items())]
        if skips:
            lines += [
                "",
                "## Skipped, and why",
                "",
                "| backend | reason | tests |",
                "|---|---|---|",
            ]
            lines += [f"| {lib} | {r} | {n} |" for lib, r, n in skips]
        if self.failures:
            lines += ["", "## Failures", "", "| backend | test | message |", "|---|---|---|"]
            lines += [
                f"| {lib} | `{nodeid}` | {msg.replace('|', '/')} |"
                for lib, nodeid, msg in self.failures
            ]
        for title, body in self.sections:
            lines += ["", f"## {title}", "", *body]
        return "\n".join(lines) + "\n"
