"""Declared routes ("GET /users/{id}") → the function that serves them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from .store import RouteEntry, route_specificity


@dataclass(frozen=True, slots=True)
class Match:
    tenant_id: str
    name: str
    path_params: dict[str, str]


@dataclass(frozen=True, slots=True)
class _Compiled:
    method: str
    # One per segment before a tail: (the literal, False) or (a {param}'s name, True).
    segments: tuple[tuple[str, bool], ...]
    tail: str | None  # the name of a last {name:path} segment
    specificity: tuple[int, ...]
    entry: RouteEntry


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")  # as gateway/store.py's


def _compile(e: RouteEntry) -> _Compiled:
    segments: list[tuple[str, bool]] = []
    tail = None
    for part in e.path[1:].split("/"):  # "/" is one empty literal segment
        m = _PARAM.fullmatch(part)
        if m is None:
            segments.append((part, False))
        elif m.group(2):  # parse_route allows it last only
            tail = m.group(1)
        else:
            segments.append((m.group(1), True))
    return _Compiled(e.method, tuple(segments), tail, route_specificity(e.path), e)


def _decode(segment: str) -> str:
    # As the server decodes a whole path: UTF-8, errors replaced (the invoke
    # routes answer 400 invalid_path for what does not decode).
    return unquote(segment) if "%" in segment else segment


class RouteTable:
    """Immutable snapshot; the gateway swaps in a new one after every change.

    A route matches the path as the client sent it, split at its literal '/'
    and only then percent-decoded segment by segment: "/store/dir%2Fitem" is
    two segments, "store" and "dir/item" ("{id}" takes it), never three. A
    match on the decoded path let one tenant's "/store/{a}/{b}" take the
    requests (cookies and bodies) meant for another's "/store/{id}", routes the
    overlap check rightly saw as apart. Segments are compared whole, so a
    decoded newline or tab is a character like any other ("/exact%0A" is not
    "/exact"), and a {name:path} tail is the rest of the raw path, decoded.
    """

    def __init__(self, entries: list[RouteEntry]) -> None:
        # The most specific route first ("/users/me" before "/users/{id}" before
        # "/{rest:path}"); overlapping routes of different tenants are refused
        # when declared, so this order only ever chooses within one tenant.
        self._routes = sorted(map(_compile, entries), key=lambda c: c.specificity)

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, method: str, path: str, *, encoded: bool = True) -> Match | None:
        """The route for ``path``: the raw (still percent-encoded) path of the
        request, or, with ``encoded=False``, a path already decoded (a server
        that gives no raw path: "%2F" can no longer be told from "/" there)."""
        if not path.startswith("/"):
            return None
        raw = path[1:].split("/")
        decoded = [_decode(s) for s in raw] if encoded else raw
        for c in self._routes:
            if c.method not in ("ANY", method) and not (c.method == "GET" and method == "HEAD"):
                continue
            n = len(c.segments)
            if len(raw) != n if c.tail is None else len(raw) <= n:
                continue
            params: dict[str, str] = {}
            for segment, (text, is_param) in zip(decoded, c.segments, strict=False):
                if not is_param:
                    if segment != text:
                        break
                elif not segment:  # a {param} is one non-empty segment
                    break
                else:
                    params[text] = segment
            else:
                if c.tail is not None:
                    rest = "/".join(raw[n:])
                    params[c.tail] = _decode(rest) if encoded else rest
                return Match(c.entry.tenant_id, c.entry.name, params)
        return None
