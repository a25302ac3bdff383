"""A name -> object registry shared by methods and datasets.

Unlike timm's, a duplicate registration is an error: a silently shadowed
method would corrupt the leaderboard.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects registered under unique lowercase names."""

    def __init__(self, kind: str):
        self.kind = kind  # "method", "dataset", ... used in error messages
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def decorator(self, name_of: Callable[[T], str]) -> Callable[[T], T]:
        """A decorator registering an object under `name_of(obj)`."""

        def register(entry: T) -> T:
            return self.add(name_of(entry), entry)

        return register

    def get(self, name: str) -> T:
        """The entry named `name`, or a UserError listing the valid names."""
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a wildcard pattern, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
