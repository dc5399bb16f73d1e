"""The supported JAX range: one range in pyproject.toml and in the import-time check, and the check warns."""

import pathlib
import tomllib
import warnings

import pytest

from jaxsparse import _jax_version

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _pyproject_bound(name):
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.split(">")[0].split("<")[0].strip() == name]
    return spec


@pytest.mark.parametrize("name", ["jax", "jaxlib"])
def test_pyproject_declares_the_checked_range(name):
    lo = ".".join(map(str, _jax_version.MIN_JAX))
    hi = ".".join(map(str, _jax_version.MAX_JAX))
    assert _pyproject_bound(name) == f"{name}>={lo},<{hi}"


@pytest.mark.parametrize(
    "version, ok",
    [
        ("0.10.2", True),
        ("0.11.2", True),
        ("0.12.0.1", True),
        ("0.12.9", True),
        ("0.10.1", False),
        ("0.9.2", False),
        ("0.13.0", False),
        ("0.13.0rc1", False),
        ("1.0.0", False),
    ],
)
def test_is_supported(version, ok):
    assert _jax_version.is_supported(version) is ok


def test_installed_jax_is_supported():
    import jax

    assert _jax_version.is_supported(jax.__version__), jax.__version__


def test_unsupported_version_warns_naming_both():
    with pytest.warns(RuntimeWarning, match=r"jax>=0\.10\.2,<0\.13; found jax 0\.13\.1"):
        _jax_version.warn_if_unsupported("0.13.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _jax_version.warn_if_unsupported("0.12.0.1")
