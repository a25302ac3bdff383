"""A name -> object registry shared by methods and datasets, open to installed plug-ins.

Unlike timm's, a duplicate registration is an error: a silently shadowed
method would corrupt the leaderboard.

Plug-ins: a package declares entry points in a registry's group (methods in
`pflbench.methods`, datasets in `pflbench.datasets`); the registry imports them
on its first lookup, in every process that looks (a spawned or `python -m`
worker included), so code registered only at run time is never needed there.
"""

from __future__ import annotations

import fnmatch
from importlib import metadata
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UserError, error_summary

T = TypeVar("T")

_reporters: list[Callable[[str], None]] = []  # where a plug-in that failed to load is reported (the CLI's stderr)
_loading: list[str] = []  # the package whose plug-in is being imported: what it registers is its own


def report_plugin_errors(report: Callable[[str], None]) -> None:
    """Report every plug-in that fails to load from now on (one line each) through `report` (replacing any)."""
    _reporters[:] = [report]


class Registry(Generic[T]):
    """Objects registered under unique lowercase names, plus those of installed plug-ins."""

    def __init__(self, kind: str, group: str | None = None, adopt: Callable[[str, Any], None] | None = None):
        self.kind = kind  # "method", "dataset", ... used in error messages
        self.group = group  # entry-point group of plug-ins, loaded on the first lookup; None: none
        self._adopt = adopt  # registers an entry point's object that did not register itself
        self._entries: dict[str, T] = {}
        self._plugins_loaded = group is None
        self.plugins: dict[str, str] = {}  # name -> the installed package it came from
        self.plugin_errors: dict[str, str] = {}  # entry-point name -> why it did not load

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name can be registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        if _loading:
            self.plugins[name] = _loading[-1]
        return entry

    def decorator(self, name_of: Callable[[T], str]) -> Callable[[T], T]:
        """A decorator registering an object under `name_of(obj)`."""

        def register(entry: T) -> T:
            return self.add(name_of(entry), entry)

        return register

    def load_plugins(self) -> None:
        """Import the plug-ins of this registry's entry-point group (once per process).

        A plug-in that fails to import, or registers nothing under its entry point's name,
        is skipped, recorded in `plugin_errors` and reported in one line; the rest load.
        """
        if self._plugins_loaded:
            return
        self._plugins_loaded = True  # before importing: a plug-in's own registration looks names up
        for ep in sorted(metadata.entry_points(group=self.group), key=lambda e: e.name):
            package = ep.dist.name if ep.dist is not None else "an unnamed package"
            before = set(self._entries)
            _loading.append(package)
            try:
                obj = ep.load()
                if ep.name not in self._entries and self._adopt is not None:
                    self._adopt(ep.name, obj)
                if ep.name not in self._entries:
                    raise ValueError(f"{ep.value} registers no {self.kind} named {ep.name!r}")
            except Exception as err:  # a broken plug-in must not take the built-in ones down with it
                for name in set(self._entries) - before:  # nothing half-loaded stays
                    del self._entries[name]
                    self.plugins.pop(name, None)
                why = f"plug-in {self.kind} {ep.name!r} from package {package} failed to load: {error_summary(err)}"
                self.plugin_errors[ep.name] = why
                for report in _reporters:
                    report(f"{why}; skipped")
            finally:
                _loading.pop()

    def get(self, name: str) -> T:
        """The entry named `name`, or a UserError listing the valid names."""
        self.load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            if name in self.plugin_errors:
                raise UserError(self.plugin_errors[name]) from None
            raise UserError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a wildcard pattern, sorted."""
        self.load_plugins()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        self.load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._entries)
