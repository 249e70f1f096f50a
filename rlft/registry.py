"""Registries: each family of interchangeable pieces (advantage estimators, policy losses, KL
estimators, loss aggregations, rewards) is one `Registry`, and the registry *is* the dispatch.

A flag names a built-in entry, or a user's own function as "module:function" (importable from the
current directory, as for `python -m`; "package.module:function" for a package). A user entry
obeys the same contract as the built-ins (the registry's docstring at its definition says it); a
wrong signature or a wrong return shape is an RlftError naming the flag and the contract when the
function is first called, which for the pieces of the RL step is while the first step compiles.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlft.errors import RlftError


def is_user_entry(name: str) -> bool:
    """Whether `name` is a "module:function" spec rather than a built-in name."""
    return ":" in str(name)


def import_function(spec: str, field: str) -> Callable:
    """The callable named by "package.module:function" (the current directory on the import path);
    an RlftError naming `field` when it cannot be imported or is not callable."""
    module, _, name = str(spec).partition(":")
    if not module or not name:
        raise RlftError(f"{field}={spec!r}: expected a built-in name or 'module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise RlftError(f"{field}={spec!r}: cannot import it ({e})") from None
    if not callable(fn):
        raise RlftError(f"{field}={spec!r}: not callable")
    return fn


class Registry(dict):
    """name -> function for one family; `resolve` also accepts "module:function".

    family: what the entries are ("advantage estimator"); contract: their signature and return, as
    messages quote it.
    """

    def __init__(self, family: str, contract: str, entries: Mapping[str, Callable] = ()):
        super().__init__(entries)
        self.family, self.contract = family, contract

    def resolve(self, name: str, field: str) -> Callable:
        """The entry `name` (a built-in, or a user's "module:function"), or an RlftError naming
        `field` and the choices."""
        if name in self:
            return self[name]
        if is_user_entry(name):
            return import_function(name, field)
        raise RlftError(f"{field}={name!r}: expected one of {sorted(self)} or a {self.family} of your own "
                        f"as 'module:function'")

    def check(self, name: str, field: str) -> None:
        """Raises RlftError naming `field` unless `name` resolves (imports a user entry)."""
        self.resolve(name, field)

    def call(self, name: str, field: str, *args: Any, **kwargs: Any) -> Any:
        """The entry called with (args, kwargs); a user entry that cannot take them (a TypeError)
        is an RlftError naming `field` and the family's contract."""
        fn = self.resolve(name, field)
        if not is_user_entry(name):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            raise RlftError(f"{field}={name!r}: calling it as a {self.family} failed ({e}); the contract is "
                            f"{self.contract}") from e

    def expect_pair(self, value: Any, name: str, field: str, parts: str) -> tuple:
        """`value` as a 2-tuple, or an RlftError naming `field` and the contract (`parts` names what
        the pair holds, e.g. "(loss_sum, count)")."""
        if not isinstance(value, tuple) or len(value) != 2:
            raise RlftError(f"{field}={name!r} returned a {type(value).__name__}, expected a pair {parts}; the "
                            f"contract is {self.contract}")
        return value

    def expect_shape(self, value: Any, shape: Sequence[int], name: str, field: str, what: str = "returned") -> None:
        """Raises RlftError naming `field` and the contract unless `value` is an array of `shape`."""
        got = getattr(value, "shape", None)
        if got is None or tuple(got) != tuple(shape):
            kind = f"shape {tuple(got)}" if got is not None else f"a {type(value).__name__}"
            raise RlftError(f"{field}={name!r} {what} {kind}, expected shape {tuple(shape)}; the contract is "
                            f"{self.contract}")
