"""Per-framework adapters of topk-core (autodiff rules, modules, losses),
installed as ``topk_core.adapters``."""

if __name__ != "topk_core.adapters":
    # PyPI has an unrelated distribution called "adapters".
    raise ImportError(
        f"this package must be imported as 'topk_core.adapters', not {__name__!r}; "
        "install topk-core (pip install -e .) instead of putting its folders on sys.path"
    )
