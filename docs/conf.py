"""Sphinx configuration for the jaxsparse API reference (``make docs``).

Sphinx with autodoc, napoleon (Google-style Args/Returns) and MyST is what JAX, Flax and optax build their sites
with, so the reference reads like theirs and the same docstring conventions render.

The API pages are generated here from the packages' ``__all__``: every public name lands on the page of its
family (chosen by the module that defines it), so a new public name cannot be left undocumented, and a module
that belongs to no family stops the build.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys
import types

project = "jaxsparse"
author = "the jaxsparse authors"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md"]
html_theme = "sphinx_book_theme"
html_title = "jaxsparse"
myst_heading_anchors = 3
autodoc_typehints = "none"  # jaxtyping annotations read better in the prose than in signatures
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
suppress_warnings = ["myst.header"]

HERE = pathlib.Path(__file__).resolve().parent

# (page file, title, intro, defining-module prefixes). The first matching prefix wins.
FAMILIES = [
    (
        "masks",
        "Masks, budgets and leaf selection",
        "Pure functions on pytrees: top-k, N:M, block and random masks, per-layer budgets (uniform, ER, ERK), which "
        "leaves are prunable, and one-shot masks.",
        [
            "jaxsparse.masks",
            "jaxsparse.allocation",
            "jaxsparse.oneshot",
            "jaxsparse.pruning_at_init",
            "jaxsparse.sharding",
            "jaxsparse._tree",
            "pallas_kernels.nm.masks",
        ],
    ),
    (
        "schedules",
        "Schedules and update gates",
        "Every schedule (sparsity, drop fraction, gradient annealing, mask decay) and the mask-update gate.",
        ["jaxsparse.schedules"],
    ),
    (
        "training",
        "Training transformations",
        "The shared sparse wrapper around any optax optimizer and the dense-to-sparse algorithms built on it.",
        [
            "jaxsparse.transforms.common",
            "jaxsparse.transforms._factory",
            "jaxsparse.transforms.pruning",
        ],
    ),
    (
        "dst",
        "Dynamic sparse training",
        "Sparse-to-sparse training: static, SET, RigL, SNFS, GraNet and the second-wave algorithms.",
        ["jaxsparse.transforms"],
    ),
    (
        "estimators",
        "Straight-through family and N:M",
        "Forward-time estimators called on ``params`` inside the loss (STE, SR-STE, mask and structure decay, "
        "S-STE, gradient annealing) and N:M compression of a trained model.",
        ["jaxsparse.estimators", "jaxsparse.nm_compression"],
    ),
    (
        "posttraining",
        "Post-training pruning",
        "Per-layer pruning functions (magnitude, Wanda, SparseGPT, DSnoT), calibration statistics, OWL layer-wise "
        "sparsity and the layer-by-layer driver for Flax models.",
        ["jaxsparse.posttraining"],
    ),
    (
        "flax",
        "Flax layers and conversion",
        "Block-sparse and N:M linear layers for NNX and Linen on the kernels, and conversion between masked dense "
        "parameters and compressed layers.",
        ["jaxsparse.flax"],
    ),
    (
        "kernels",
        "Kernels and dispatch",
        "Fixed-capacity block-sparse and N:M formats, their matmuls (custom VJP: forward, dX, dW) and the dispatcher "
        "that picks dense, the XLA reference or a Pallas kernel.",
        ["pallas_kernels"],
    ),
    (
        "checkpoints",
        "Checkpoints",
        "Save and restore sparse training state and compressed models through orbax.",
        ["jaxsparse.checkpoint"],
    ),
    (
        "measuring",
        "Measuring and lottery tickets",
        "Sparsity statistics, FLOPs, and iterative magnitude pruning masks.",
        ["jaxsparse.stats", "jaxsparse.lottery"],
    ),
    (
        "multihost",
        "Multi-host",
        "Running on several processes with JAX's distributed runtime.",
        ["jaxsparse._launch", "jaxsparse.distributed", "jaxsparse.multihost"],
    ),
]
PUBLIC_PACKAGES = ["jaxsparse", "jaxsparse.flax", "jaxsparse.posttraining", "pallas_kernels"]


def _family(qualified_module: str) -> str:
    for page, _, _, prefixes in FAMILIES:
        if any(qualified_module == p or qualified_module.startswith(p + ".") for p in prefixes):
            return page
    raise RuntimeError(
        f"docs/conf.py: public objects from module {qualified_module!r} belong to no family; add the module to "
        "FAMILIES."
    )


def _defining_module(package: str, name: str, obj: object) -> str:
    """The module an object comes from; for constants (tuples, strings) the submodule whose ``__all__`` has it."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None)
    if isinstance(module, str) and module.split(".")[0] in ("jaxsparse", "pallas_kernels"):
        return module
    for mod_name, mod in sorted(sys.modules.items()):
        if mod_name.startswith(package.split(".")[0]) and mod_name != package and mod is not None:
            if name in getattr(mod, "__all__", ()) and getattr(mod, name, None) is obj:
                return mod_name
    return package


def _directive(full_name: str, obj: object) -> str:
    if isinstance(obj, types.ModuleType):
        return f".. automodule:: {obj.__name__}\n   :members:\n   :exclude-members: __getattr__\n"
    if inspect.isclass(obj) and issubclass(
        obj, tuple
    ):  # NamedTuple: its docstring documents the fields
        return f".. autoclass:: {full_name}\n"
    if inspect.isclass(obj):
        return f".. autoclass:: {full_name}\n   :members:\n"
    if inspect.isroutine(obj) or (callable(obj) and hasattr(obj, "__wrapped__")):
        return f".. autofunction:: {full_name}\n"
    return f".. autodata:: {full_name}\n   :annotation:\n"


def _generate_api_pages() -> list[str]:
    """Write ``api/<family>.md`` with one entry per public name; returns the names documented."""
    entries: dict[str, list[str]] = {page: [] for page, *_ in FAMILIES}
    seen: dict[int, str] = {}
    documented = []
    for package in PUBLIC_PACKAGES:
        mod = importlib.import_module(package)
        for name in mod.__all__:
            obj = getattr(mod, name)
            full = f"{package}.{name}"
            defining = _defining_module(package, name, obj)
            if id(obj) in seen and not isinstance(obj, (str, int, float, tuple)):
                # re-exported under a second public path: document it once, at its first public name
                documented.append(full)
                continue
            seen[id(obj)] = full
            entries[_family(defining)].append(_directive(full, obj))
            documented.append(full)
    out = HERE / "api"
    out.mkdir(exist_ok=True)
    written = []
    for page, title, intro, _ in FAMILIES:
        path = out / f"{page}.md"
        if not entries[page]:
            path.unlink(missing_ok=True)
            continue
        written.append(page)
        body = "\n".join(entries[page])
        path.write_text(f"# {title}\n\n{intro}\n\n```{{eval-rst}}\n{body}```\n")
    toc = "\n".join(written)
    (out / "index.md").write_text(
        "# API reference\n\nEvery public name, by family.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n"
    )
    return documented


DOCUMENTED = _generate_api_pages()
