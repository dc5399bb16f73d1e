"""Every public function of jaxsparse, jaxsparse.flax, jaxsparse.posttraining and pallas_kernels documents its
arguments (``Args:``, naming each parameter), its result (``Returns:``) and a runnable ``>>>`` example; so does
every function of a public submodule they export (``jaxsparse.checkpoint``).

The examples themselves run as doctests (``--doctest-modules jaxsparse pallas_kernels`` in ``make test``); this
test checks that none is missing. Generated training transforms (``jaxsparse.rigl`` etc., see
``jaxsparse/transforms/_factory.py``) are checked against their public signature, so their docstrings must document
``inner`` and ``seed`` too.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

import pytest

PACKAGES = ("jaxsparse", "jaxsparse.flax", "jaxsparse.posttraining", "pallas_kernels")


def _public_functions() -> list[tuple[str, object]]:
    found, seen = [], set()
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                obj = getattr(module, name)
            if inspect.ismodule(obj):  # a public submodule (jaxsparse.checkpoint): its own __all__
                members = [(f"{package}.{name}.{n}", getattr(obj, n)) for n in obj.__all__]
            else:
                members = [(f"{package}.{name}", obj)]
            for qualname, member in members:
                if inspect.isfunction(inspect.unwrap(member)) and id(member) not in seen:
                    seen.add(id(member))
                    found.append((qualname, member))
    return found


FUNCTIONS = _public_functions()


def _documented_parameters(doc: str) -> set[str]:
    """Names listed in the Google-style ``Args:`` section (``name: ...`` one indent level below it)."""
    match = re.search(r"^([ \t]*)Args:\n((?:\1[ \t]+.*\n|[ \t]*\n)+)", doc + "\n", re.MULTILINE)
    if not match:
        return set()
    lines = [line for line in match.group(2).splitlines() if line.strip()]
    indent = len(lines[0]) - len(
        lines[0].lstrip()
    )  # the entries' indentation; continuations are deeper
    names = set()
    for line in lines:
        entry = re.match(r"^[ \t]+(\*{0,2}\w+(?:, \*{0,2}\w+)*)(?: \(.*?\))?:", line)
        if entry and len(line) - len(line.lstrip()) == indent:
            names.update(n.lstrip("*") for n in entry.group(1).split(", "))
    return names


def test_public_functions_found():
    names = [n for n, _ in FUNCTIONS]
    assert len(names) > 100, names  # the four packages export over 100 functions
    for expected in (
        "jaxsparse.rigl",
        "jaxsparse.posttraining.prune_nnx",
        "pallas_kernels.nm_matmul",
    ):
        assert expected in names


@pytest.mark.parametrize("name, fn", FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_docstring_sections(name, fn):
    doc = inspect.getdoc(fn) or ""
    params = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = []
    if params:
        if not re.search(r"^\s*Args:\s*$", doc, re.MULTILINE):
            missing.append("an Args: section")
        else:
            undocumented = [p for p in params if p not in _documented_parameters(doc)]
            if undocumented:
                missing.append(f"Args entries for {undocumented}")
    if not re.search(r"^\s*(Returns|Yields):\s*$", doc, re.MULTILINE):
        missing.append("a Returns: section")
    if not re.search(r"^\s*>>> ", doc, re.MULTILINE):
        missing.append("a >>> example")
    assert not missing, f"{name}'s docstring lacks {', '.join(missing)}"


def test_documented_parameters_parser():
    doc = inspect.cleandoc(
        """Summary.

        Args:
          a: first.
          b_2 (int): second,
            continued: not an entry.
          n, m: a pair.
          **kwargs: extra.

        Returns:
          x: not an argument.
        """
    )
    assert _documented_parameters(doc) == {"a", "b_2", "n", "m", "kwargs"}
