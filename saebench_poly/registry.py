"""A small generic registry for sources, model loaders and metrics.

Modelled on lm-evaluation-harness's registry: names register by decorator or lazily as ``"module:attr"`` strings
(importing the package stays cheap), a name registered twice raises with both origins, an unknown name suggests close
ones, and third-party packages register through an entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from saebench_poly.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects, loading ``"module:attr"`` strings on first use."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._items: dict[str, T | str] = {}
        self._origins: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | str | None = None, origin: str | None = None) -> Callable[[T], T] | None:
        """Register ``obj`` (or a lazy ``"module:attr"``) under ``name``; without ``obj``, act as a decorator."""
        if obj is None:

            def decorator(target: T) -> T:
                self._add(name, target, origin or _origin_of(target))
                return target

            return decorator
        self._add(name, obj, origin or (obj if isinstance(obj, str) else _origin_of(obj)))
        return None

    def _add(self, name: str, obj: T | str, origin: str) -> None:
        if name in self._items and self._origins[name] != origin:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice: by {self._origins[name]} and by {origin}"
            )
        self._items[name] = obj
        self._origins[name] = origin

    def _load_entry_points(self) -> None:
        """Add the group's entry points. A name that is already taken (by a built-in or another entry point) is a
        `UserError` naming both origins: silently keeping one would score with code the user did not choose."""
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.entry_point_group):
            origin = f"entry point {ep.value} (package {ep.dist.name if ep.dist else '?'})"
            if ep.name in self._items and self._origins[ep.name] != origin:
                raise UserError(
                    f"{self.kind} {ep.name!r} is registered twice: by {self._origins[ep.name]} and by {origin} "
                    f"(group {self.entry_point_group}); rename the entry point or uninstall one of the packages"
                )
            self._add(ep.name, ep.value, origin)

    def get(self, name: str) -> T:
        """The object registered as ``name``; a `UserError` naming close matches when there is none."""
        self._load_entry_points()
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self._items))
            raise UserError(f"unknown {self.kind} {name!r}{hint} (known: {known})")
        item = self._items[name]
        if isinstance(item, str):
            module_name, _, attr = item.partition(":")
            item = getattr(importlib.import_module(module_name), attr)
            self._items[name] = item
        return item  # type: ignore[return-value]

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def origin(self, name: str) -> str:
        self._load_entry_points()
        return self._origins[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _origin_of(obj: object) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", type(obj).__qualname__)
    return f"{module}:{qualname}"
