"""Per-library backends of topk-core, installed as ``topk_core.backends``.

Each module adds only what must differ per array library: the selection of the
k-th and (k+1)-th largest values, and optionally native kernels.
"""

if __name__ != "topk_core.backends":
    # PyPI has an unrelated distribution called "backends": this folder must only
    # ever be imported as part of topk_core.
    raise ImportError(
        f"this package must be imported as 'topk_core.backends', not {__name__!r}; "
        "install topk-core (pip install -e .) instead of putting its folders on sys.path"
    )
