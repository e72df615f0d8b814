"""topk-core's conformance suite, installed as ``topk_core.conformance``.

Run it against any array library after ``pip install topk-core[conformance]``,
no checkout needed::

    python -m topk_core.conformance --array-module array_api_strict
    python -m topk_core.conformance --array-module dask.array
    python -m topk_core.conformance --array-module mylib --backend mylib_topk:BACKEND

That runs only the checks about that library (contract, forward, gradients,
errors, determinism, dtype/device, linear scaling) and the mutation proof
against it, and writes a per-library Markdown report (see
:mod:`topk_core.conformance.__main__`).

Layout (the folder ``conformance_tests/`` of the repository; setuptools maps it
to ``topk_core.conformance``, like ``backends/`` and ``adapters/``):

``plugin.py``
    The pytest plugin: ``--array-module``, ``--backend``, ``--conformance-report``
    and the ``lib``, ``rng`` and ``conformance_record`` fixtures.  Never
    auto-loaded into other pytest runs (no entry point): the runner passes
    ``-p topk_core.conformance.plugin``, and the project's ``pyproject.toml``
    adds it to the project's own pytest runs.
``libs.py``, ``reference.py``, ``scaling.py``, ``report.py``
    Libraries under test and tolerances, the independent float64 reference, the
    scaling method, the Markdown report.
``test_contract.py``, ``test_forward.py``, ``test_gradients.py``, ``test_errors.py``,
``test_scaling.py``
    The third-party checks (:data:`SUITE_FILES`): every test takes the ``lib``
    fixture.
``mutants.py``, ``mutation_proof.py``
    Planted bugs, and the proof that the suite catches each of them.
``project/``
    The project's own tests (torch/JAX adapters, radix internals, losses,
    packaging, the benchmark CLI, the suite's plumbing).  NOT installed; run by
    ``python -m pytest`` from a checkout (CI).  New project test files go here.
"""

#: the test files a third-party run executes, in order
SUITE_FILES = (
    "test_contract.py",
    "test_forward.py",
    "test_gradients.py",
    "test_errors.py",
    "test_scaling.py",
)

#: the files each planted bug must make fail (the mutation proof)
MUTATION_FILES = ("test_contract.py", "test_forward.py", "test_gradients.py")

__all__ = ["MUTATION_FILES", "SUITE_FILES"]
