"""The README is executed and checked: its API overview lists exactly the public face, and its Python blocks run."""

import pathlib
import re
import warnings

import pytest

import jaxsparse as js
import jaxsparse.flax as jsf
import jaxsparse.posttraining as jsp
import pallas_kernels as pk

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def _named(text: str) -> set[str]:
    """Identifiers written in backticks, `name` or `name(...)` or `pkg.name`, last dotted part."""
    return {m.split(".")[-1] for m in re.findall(r"`([A-Za-z_][\w.]*)(?:\(|`)", text)}


@pytest.mark.parametrize("module", [js, jsf, jsp, pk], ids=lambda m: m.__name__)
def test_api_overview_lists_every_public_name(module):
    named = _named(_section("API overview"))
    missing = sorted(set(module.__all__) - named)
    assert not missing, f"README API overview does not mention {module.__name__}: {missing}"


def test_api_overview_names_nothing_removed():
    named = _named(_section("API overview"))
    public = {name for module in (js, jsf, jsp, pk) for name in module.__all__}
    deprecated = []
    for module in (js, jsf, jsp, pk):
        for name in named - public:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                getattr(module, name, None)
            if any(issubclass(w.category, DeprecationWarning) for w in caught):
                deprecated.append(f"{module.__name__}.{name}")
    assert not deprecated, f"README API overview names deprecated names: {deprecated}"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quickstart_runs():
    (block,) = _python_blocks(_section("Quickstart"))
    namespace: dict = {}
    exec(compile(block, "README.md:Quickstart", "exec"), namespace)
    params = namespace["params"]
    assert js.global_sparsity(params) == pytest.approx(0.9, abs=0.01)
