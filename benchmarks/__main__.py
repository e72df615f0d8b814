"""``python -m benchmarks``: see :mod:`benchmarks.cli`."""

import importlib.util
import sys


def _topk_core_problem() -> str | None:
    """Why ``topk_core`` as imported from here cannot run the benchmarks, or None.

    Run from a checkout, ``topk_core`` is the checkout's ``topk_core/`` folder
    (the current directory comes first on ``sys.path``).  Its ``backends`` and
    ``adapters`` subpackages are the top-level ``backends/`` and ``adapters/``
    folders, which only an install maps into it: an editable install maps them
    onto the checkout, while a plain ``pip install .`` puts a copy in
    site-packages that the checkout's folder shadows, so they are missing.

    Returns
    -------
    str or None
        The error message, or None when ``topk_core.backends`` can be imported.
    """
    try:
        found = importlib.util.find_spec("topk_core.backends")
    except ImportError as exc:  # topk_core itself (or a dependency) is missing
        return f"cannot import topk_core ({exc}); install this checkout with pip install -e ."
    if found is not None:
        return None
    where = getattr(sys.modules.get("topk_core"), "__file__", None) or "topk_core"
    return (
        f"topk_core is imported from {where}, which has no topk_core.backends: "
        "backends/ and adapters/ become part of topk_core only through an install, and "
        "the benchmarks run against this checkout's code, so they need an editable "
        "install of it: pip install -e . (a plain pip install . is shadowed here)"
    )


if __name__ == "__main__":
    problem = _topk_core_problem()
    if problem is not None:
        sys.exit(f"python -m benchmarks: error: {problem}")
    from .cli import main

    sys.exit(main())
