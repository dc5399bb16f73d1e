"""The JAX versions this release supports, checked once at import.

The range is the one CI tests (jax 0.10.2 on Python 3.11 and the newest 0.12.x on Python 3.12) and the one
``pyproject.toml`` declares; ``tests/test_versions.py`` keeps the two equal.
"""

import warnings

import jax

MIN_JAX = (0, 10, 2)  # inclusive
MAX_JAX = (0, 13)  # exclusive


def parse_version(version: str) -> tuple[int, ...]:
    """Leading numeric components of a version string: ``"0.12.0.1"`` -> ``(0, 12, 0, 1)``, ``"0.11.0rc1"`` ->
    ``(0, 11, 0)``."""
    parts = []
    for piece in version.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    return tuple(parts)


def is_supported(version: str) -> bool:
    """Whether a jax version string lies in ``[MIN_JAX, MAX_JAX)``."""
    v = parse_version(version)
    return MIN_JAX <= v and v[: len(MAX_JAX)] < MAX_JAX


def warn_if_unsupported(version: str = jax.__version__) -> None:
    """Warn (once, at import) when the installed jax is outside the tested range."""
    if not is_supported(version):
        lo = ".".join(map(str, MIN_JAX))
        hi = ".".join(map(str, MAX_JAX))
        warnings.warn(
            f"jaxsparse is tested with jax>={lo},<{hi}; found jax {version}. Kernels and sharded training may "
            "break; install a supported jax (`pip install 'jax>={lo},<{hi}'`).",
            RuntimeWarning,
            stacklevel=2,
        )


warn_if_unsupported()
