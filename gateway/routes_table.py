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
    method: str = "ANY"  # the route's declared method


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
    params: tuple[tuple[int, str], ...]  # (segment index, name) of every {param}
    # The most specific first; ties in the store's order (path, method, tenant, name).
    order: tuple[tuple[int, ...], str, str, str, str]
    key: _Key
    # True when the tree's order (per segment: literal, {param}, then a tail)
    # is the order's: every route parse_route accepts. Others (none declared
    # today) are matched one by one, as before, so they keep their old order.
    regular: bool
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
    key = (e.method, e.path, e.tenant_id, e.name)
    specificity = route_specificity(e.path)
    order = (specificity, e.path, e.method, e.tenant_id, e.name)
    kinds = tuple(1 if is_param else 0 for _, is_param in segments) + ((2,) if tail else ())
    # "/" is one empty literal segment here and () to the order; the only other
    # route that matches the path "/" is "/{p:path}", (2,), after it either way.
    regular = kinds == specificity or e.path == "/"
    params = tuple((i, text) for i, (text, is_param) in enumerate(segments) if is_param)
    return _Compiled(e.method, tuple(segments), tail, params, order, key, regular, e)


def _decode(segment: str) -> str:
    # As the server decodes a whole path: UTF-8, errors replaced (the invoke
    # routes answer 400 invalid_path for what does not decode).
    return unquote(segment) if "%" in segment else segment


class _Node:
    """A node of the route tree: what follows a sequence of segments.

    ``lit`` leads on by a literal segment, ``param`` by a {param} (any
    non-empty segment); ``end`` holds the routes that end here, ``tail`` those
    whose {name:path} tail begins here, each sorted by their order. A node a
    table holds is never changed again; a build copies the ones it changes
    (``owner`` is the build that may still change it)."""

    __slots__ = ("end", "lit", "owner", "param", "tail")

    def __init__(self, owner: object) -> None:
        self.lit: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.end: tuple[_Compiled, ...] = ()
        self.tail: tuple[_Compiled, ...] = ()
        self.owner: object = owner

    def copy(self, owner: object) -> _Node:
        n = _Node(owner)
        n.lit = dict(self.lit)
        n.param, n.end, n.tail = self.param, self.end, self.tail
        return n

    def empty(self) -> bool:
        return not self.lit and self.param is None and not self.end and not self.tail


class _Build:
    """One new tree from the last one: copies only the nodes on the way to a
    route that was added or removed (each at most once)."""

    def __init__(self, root: _Node | None) -> None:
        self.owner = object()
        self.root = root.copy(self.owner) if root is not None else _Node(self.owner)
        self.leaves: dict[int, _Node] = {}  # whose end or tail must be sorted again

    def _own(self, node: _Node) -> _Node:
        return node if node.owner is self.owner else node.copy(self.owner)

    def add(self, c: _Compiled) -> None:
        node = self.root
        for text, is_param in c.segments:
            if is_param:
                child = node.param
                node.param = child = _Node(self.owner) if child is None else self._own(child)
            else:
                child = node.lit.get(text)
                node.lit[text] = child = _Node(self.owner) if child is None else self._own(child)
            node = child
        if c.tail is None:
            node.end = (*node.end, c)
        else:
            node.tail = (*node.tail, c)
        self.leaves[id(node)] = node

    def remove(self, c: _Compiled) -> None:
        node = self.root
        trail: list[tuple[_Node, str | None]] = []  # (parent, literal or None for param)
        for text, is_param in c.segments:
            if is_param:
                child = node.param
                assert child is not None
                node.param = child = self._own(child)
                trail.append((node, None))
            else:
                child = node.lit[text]
                node.lit[text] = child = self._own(child)
                trail.append((node, text))
            node = child
        if c.tail is None:
            node.end = tuple(r for r in node.end if r is not c)
        else:
            node.tail = tuple(r for r in node.tail if r is not c)
        while trail and node.empty():  # a branch nothing uses any more goes
            parent, edge = trail.pop()
            if edge is None:
                parent.param = None
            else:
                del parent.lit[edge]
            node = parent

    def finish(self) -> _Node:
        for node in self.leaves.values():
            node.end = tuple(sorted(node.end, key=_order))
            node.tail = tuple(sorted(node.tail, key=_order))
        return self.root


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

    Routes are kept in a tree by segment (``_Node``): a request follows its
    segments down it, a literal before a {param} before a {name:path} tail
    (the most specific route first, as ``route_specificity`` orders them),
    and steps back only where a branch it took ends without a route for it.
    A request looks at the nodes whose segments match its own, never at the
    routes of other paths: a lookup per segment where routes do not overlap,
    however many routes share its first segment (a scan of the routes of the
    first segment let one tenant's 4,000 routes under "/a" slow every request
    under "/a", its neighbours' too, tenfold). A new snapshot built with
    ``previous=`` reuses every compiled route and every node the change did
    not touch (the nodes on the way to an added or removed route are copied),
    so a deploy costs the gateway's event loop a dictionary lookup per
    declared route (the routes come from the store whole) plus the work on
    the changed ones, not a parse of them all (thousands of routes froze
    every call for tens to hundreds of ms on each deploy, rollback and delete).
    """

    __slots__ = ("_by_key", "_odd", "_root")
    _by_key: dict[_Key, _Compiled]  # every route
    _root: _Node  # the regular routes
    _odd: tuple[_Compiled, ...]  # the others, sorted (none that parse_route accepts)

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
        gone: list[_Compiled] = []
        if previous is not None and len(old) + len(fresh) != len(by_key):  # some routes went
            gone = [old[k] for k in old.keys() - by_key.keys()]
        if previous is not None and not fresh and not gone:
            self._root, self._odd = previous._root, previous._odd
            return
        build = _Build(previous._root if previous is not None else None)
        odd = list(previous._odd) if previous is not None else []
        for c in gone:
            if c.regular:
                build.remove(c)
            else:
                odd.remove(c)
        for c in fresh.values():
            if c.regular:
                build.add(c)
            else:
                odd.append(c)
        self._root = build.finish()
        self._odd = tuple(sorted(odd, key=_order))

    @property
    def _buckets(self) -> dict[str, _Node]:
        """The subtrees by literal first segment."""
        return self._root.lit

    def __len__(self) -> int:
        return len(self._by_key)

    def match(self, method: str, path: str, *, encoded: bool = True) -> Match | None:
        """The route for ``path``: the raw (still percent-encoded) path of the
        request, or, with ``encoded=False``, a path already decoded (a server
        that gives no raw path: "%2F" can no longer be told from "/" there)."""
        if not path.startswith("/"):
            return None
        raw = path[1:].split("/")
        root = self._root
        first = _decode(raw[0]) if encoded else raw[0]
        if first not in root.lit and root.param is None and not root.tail and not self._odd:
            return None
        decoded = [first, *map(_decode, raw[1:])] if encoded else raw
        found = _search(root, method, decoded)
        if self._odd:
            # Routes parse_route refuses (none are declared today): matched one
            # by one, whichever of the two is the more specific serves.
            other = _first_match(self._odd, method, raw, decoded, encoded)
            if other is not None and (found is None or other[0].order < found.order):
                return Match(
                    other[0].entry.tenant_id, other[0].entry.name, other[1], other[0].method
                )
        if found is None:
            return None
        params = {name: decoded[i] for i, name in found.params}
        if found.tail is not None:
            rest = "/".join(raw[len(found.segments) :])
            params[found.tail] = _decode(rest) if encoded else rest
        return Match(found.entry.tenant_id, found.entry.name, params, found.method)


def _search(root: _Node, method: str, segments: list[str]) -> _Compiled | None:
    """The first route in the tree's order that matches: depth first, a literal
    before a {param} before a tail at every segment."""
    n = len(segments)
    stack: list[tuple[_Node, int]] = []  # where to go on: (a node, its depth) or
    node, depth = root, 0  # (a node, -1) for the tails that begin there
    while True:
        if 0 <= depth < n:
            segment = segments[depth]
            if node.tail:  # the rest of the path: after every route of this segment
                stack.append((node, -1))
            child = node.lit.get(segment)
            param = node.param if segment else None  # a {param} is one non-empty segment
            depth += 1
            if child is not None:
                if param is not None:
                    stack.append((param, depth))
                node = child
                continue
            if param is not None:
                node = param
                continue
        else:
            found = node.end if depth == n else node.tail
            for c in found:
                if c.method == method or c.method == "ANY":
                    return c
            if method == "HEAD":  # a GET route answers HEAD, unless one takes HEAD itself
                for c in found:
                    if c.method == "GET":
                        return c
        if not stack:
            return None
        node, depth = stack.pop()


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
