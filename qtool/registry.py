"""One registry per extension axis (methods, formats). Explicit registration, normalised names, aliases."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from qtool.errors import UsageError

T = TypeVar("T")


def normalize_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "method", "format": used in error messages
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = normalize_name(name)
            for n in (key, *map(normalize_name, aliases)):
                if n in self._items or n in self._aliases:
                    raise ValueError(f"{self.kind} {n!r} is already registered")
            self._items[key] = obj
            for a in aliases:
                self._aliases[normalize_name(a)] = key
            setattr(obj, "registry_name", key)
            return obj

        return deco

    def get(self, name: str) -> T:
        key = normalize_name(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            raise UsageError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[key]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        key = normalize_name(name)
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(self._items.items())
