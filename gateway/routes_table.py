"""Declared routes ("GET /users/{id}") → the function that serves them."""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.routing import compile_path

from .store import RouteEntry, route_specificity


@dataclass(frozen=True, slots=True)
class Match:
    tenant_id: str
    name: str
    path_params: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Compiled:
    method: str
    regex: re.Pattern[str]
    specificity: tuple[int, ...]
    entry: RouteEntry


class RouteTable:
    """Immutable snapshot; the gateway swaps in a new one after every change."""

    def __init__(self, entries: list[RouteEntry]) -> None:
        compiled = []
        for e in entries:
            regex, _, _ = compile_path(e.path)
            # Starlette ends the pattern in "$", which also matches before a
            # final newline ("/todos" took "/todos%0A"), and its {p:path} is
            # ".*", which stops at one: fullmatch and DOTALL, so a route takes
            # a decoded path whole or not at all.
            regex = re.compile(regex.pattern, re.DOTALL)
            compiled.append(_Compiled(e.method, regex, route_specificity(e.path), e))
        # The most specific route first ("/users/me" before "/users/{id}" before
        # "/{rest:path}"); overlapping routes of different tenants are refused
        # when declared, so this order only ever chooses within one tenant.
        self._routes = sorted(compiled, key=lambda c: c.specificity)

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, method: str, path: str) -> Match | None:
        for c in self._routes:
            if c.method not in ("ANY", method) and not (c.method == "GET" and method == "HEAD"):
                continue
            m = c.regex.fullmatch(path)
            if m:
                return Match(c.entry.tenant_id, c.entry.name, dict(m.groupdict()))
        return None
