"""Declared routes ("GET /users/{id}") → the function that serves them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from urllib.parse import unquote

from .store import RouteEntry, route_specificity


@dataclass(frozen=True, slots=True)
class Match:
    tenant_id: str
    name: str
    path_params: dict[str, str]


# A route's identity: (method, path, tenant id, function name). A tuple of
# strings hashes and compares in C, a RouteEntry's dataclass methods in Python.
_Key = tuple[str, str, str, str]
_key_of = attrgetter("method", "path", "tenant_id", "name")


@dataclass(frozen=True, slots=True)
class _Compiled:
    method: str
    # One per segment before a tail: (the literal, False) or (a {param}'s name, True).
    segments: tuple[tuple[str, bool], ...]
    tail: str | None  # the name of a last {name:path} segment
    # The most specific first; ties in the store's order (path, method, tenant, name).
    order: tuple[tuple[int, ...], str, str, str, str]
    key: _Key
    # The literal first segment every path it matches begins with (its bucket),
    # or None when the route begins with a parameter (routes declared today
    # cannot: parse_route refuses them).
    first: str | None
    entry: RouteEntry


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:path)?\}")  # as gateway/store.py's
_order = attrgetter("order")


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
    first = segments[0][0] if segments and not segments[0][1] else None
    key = (e.method, e.path, e.tenant_id, e.name)
    order = (route_specificity(e.path), e.path, e.method, e.tenant_id, e.name)
    return _Compiled(e.method, tuple(segments), tail, order, key, first, e)


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

    Routes are kept in buckets by their literal first segment (every route
    declared today has one), each bucket sorted most specific first: a request
    looks only at the routes that could match its first segment, and a new
    snapshot built with ``previous=`` reuses every compiled route and every
    bucket the change did not touch, so a deploy costs the gateway's event
    loop a dictionary lookup per declared route (the routes come from the
    store whole) plus the work on the changed ones, not a parse and sort of
    them all (thousands of routes froze every call for tens to hundreds of ms
    on each deploy, rollback and delete).
    """

    __slots__ = ("_buckets", "_by_key", "_wild")
    _by_key: dict[_Key, _Compiled]  # every route
    _buckets: dict[str | None, tuple[_Compiled, ...]]  # by literal first segment, sorted
    _wild: tuple[_Compiled, ...]  # routes without one, sorted

    def __init__(
        self, entries: Iterable[RouteEntry] = (), *, previous: RouteTable | None = None
    ) -> None:
        old = previous._by_key if previous is not None else {}
        by_key: dict[_Key, _Compiled] = {}
        fresh: dict[_Key, _Compiled] = {}
        for e in entries:
            key = _key_of(e)
            c = old.get(key)
            if c is None:
                c = fresh.get(key) or _compile(e)
                fresh[key] = c
            by_key[key] = c
        self._by_key = by_key
        # The most specific route first ("/users/me" before "/users/{id}" before
        # "/users/{rest:path}"); overlapping routes of different tenants are
        # refused when declared, so this order only ever chooses within one tenant.
        if previous is None:
            groups: dict[str | None, list[_Compiled]] = {}
            for c in by_key.values():
                groups.setdefault(c.first, []).append(c)
            buckets = {first: tuple(sorted(cs, key=_order)) for first, cs in groups.items()}
        else:
            added: dict[str | None, list[_Compiled]] = {}
            for c in fresh.values():
                added.setdefault(c.first, []).append(c)
            touched = set(added)
            if len(old) + len(fresh) != len(by_key):  # some routes went
                touched.update(old[k].first for k in old.keys() - by_key.keys())
            buckets = dict(previous._buckets)
            if previous._wild:
                buckets[None] = previous._wild
            for first in touched:  # the other buckets stay as they were
                kept = [c for c in buckets.get(first, ()) if by_key.get(c.key) is c]
                kept += added.get(first, ())
                if kept:
                    buckets[first] = tuple(sorted(kept, key=_order))
                else:
                    buckets.pop(first, None)
        self._wild = buckets.pop(None, ())
        self._buckets = buckets

    def __len__(self) -> int:
        return len(self._by_key)

    def match(self, method: str, path: str, *, encoded: bool = True) -> Match | None:
        """The route for ``path``: the raw (still percent-encoded) path of the
        request, or, with ``encoded=False``, a path already decoded (a server
        that gives no raw path: "%2F" can no longer be told from "/" there)."""
        if not path.startswith("/"):
            return None
        raw = path[1:].split("/")
        first = _decode(raw[0]) if encoded else raw[0]
        bucket = self._buckets.get(first, ())
        if not bucket and not self._wild:
            return None
        decoded = [first, *map(_decode, raw[1:])] if encoded else raw
        found = _first_match(bucket, method, raw, decoded, encoded)
        if self._wild:
            # Routes that begin with a parameter (stored before parse_route
            # refused them): whichever of the two is the more specific serves.
            other = _first_match(self._wild, method, raw, decoded, encoded)
            if other is not None and (found is None or other[0].order < found[0].order):
                found = other
        if found is None:
            return None
        c, params = found
        return Match(c.entry.tenant_id, c.entry.name, params)


def _first_match(
    routes: tuple[_Compiled, ...], method: str, raw: list[str], decoded: list[str], encoded: bool
) -> tuple[_Compiled, dict[str, str]] | None:
    for c in routes:
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
            return c, params
    return None
