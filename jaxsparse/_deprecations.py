"""One deprecation path for renamed and removed public names (as optax does): a module ``__getattr__``.

Names listed here keep working for one release and warn with a ``DeprecationWarning`` that names the replacement.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

REMOVAL = "jaxsparse 0.3"


def module_getattr(module: str, renamed: Mapping[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving deprecated names.

    Args:
      module: the module's ``__name__`` (for messages).
      renamed: old name -> (what to use instead, the object the old name still returns).

    Returns:
      ``__getattr__(name)``: the replacement object with a ``DeprecationWarning`` for a deprecated name, else
      ``AttributeError``.

    Example:
      >>> import warnings
      >>> __getattr__ = module_getattr("demo", {"old": ("demo.new", 42)})
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter("always")
      ...     value = __getattr__("old")
      >>> value, str(w[0].message)
      (42, '`demo.old` is deprecated and will be removed in jaxsparse 0.3; use `demo.new`.')
    """

    def __getattr__(name: str) -> Any:
        if name in renamed:
            instead, obj = renamed[name]
            warnings.warn(
                f"`{module}.{name}` is deprecated and will be removed in {REMOVAL}; use `{instead}`.",
                DeprecationWarning,
                stacklevel=2,
            )
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
