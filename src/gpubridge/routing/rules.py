"""Routes: ordered rules that send a job to a provider chain, and the pure decision of which one fits.

A route (``[[routes]]`` in the config file) matches jobs and names the providers that run them, with their
own failover, shadow and stage::

    [[routes]]
    name = "faceswap"                                 # optional (default: route-N)
    match = { template = "faceswap*" }                # template (glob), tags, node_class; all must hold
    providers = ["modal-faceswap", "runpod-faceswap"] # the first runs jobs, the rest are its fallbacks
    shadow = "modal-faceswap-v2"                      # optional, with shadow_rate, stage, canary_weight
    shadow_rate = 0.2

A job takes the first route that matches; none matching, the top-level ``provider``/``fallbacks``/``shadow``
(the default route). :func:`match_route` is that decision, a pure function of the routes and the request.
:func:`parse_routes` checks the table at start: unknown keys, a route naming an unknown provider, and a
route no job can reach because an earlier one takes all its jobs are :class:`~gpubridge.errors.ConfigError`
naming the line in the config file.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..models import JobRequest

__all__ = ["Match", "Route", "RouteChoice", "config_lines", "match_route", "parse_routes"]

_MATCH_KEYS = {"template", "tags", "node_class"}
_ROUTE_KEYS = {"name", "match", "providers", "shadow", "shadow_rate", "stage", "canary_weight", "queue_timeout"}
_GLOB = re.compile(r"[*?\[]")
DEFAULT_ROUTE = "default"


@dataclass(frozen=True)
class Match:
    """What a route takes: every given condition must hold (none given: every job)."""

    template: str | None = None
    """A glob over the job's template name (a job without a template never matches)."""
    tags: tuple[tuple[str, str], ...] = ()
    """Tags the job must carry; a value may be a glob."""
    node_class: tuple[str, ...] = ()
    """Node classes that must all be present in the workflow."""

    def test(self, request: JobRequest) -> str | None:
        """Why ``request`` matches (a sentence), or None when it does not."""
        reasons: list[str] = []
        if self.template is not None:
            if request.template is None or not fnmatch.fnmatchcase(request.template, self.template):
                return None
            reasons.append(f"template {request.template!r} matches {self.template!r}")
        for key, pattern in self.tags:
            value = request.tags.get(key)
            if value is None or not fnmatch.fnmatchcase(value, pattern):
                return None
            reasons.append(f"tag {key}={value!r} matches {pattern!r}")
        if self.node_class:
            present = {node.get("class_type") for node in request.workflow.to_api().values()}
            if not set(self.node_class) <= present:
                return None
            reasons.append(f"the workflow has {', '.join(self.node_class)}")
        return "; ".join(reasons) or "it matches every job"

    def covers(self, other: Match) -> bool:
        """True when every job ``other`` matches, this one matches too (decided only where certain:
        equal or catch-all patterns, and literals inside a glob)."""
        if self.template is not None and not _glob_covers(self.template, other.template):
            return False
        theirs = dict(other.tags)
        for key, pattern in self.tags:
            if not _glob_covers(pattern, theirs.get(key)):
                return False
        return set(self.node_class) <= set(other.node_class)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.template is not None:
            d["template"] = self.template
        if self.tags:
            d["tags"] = dict(self.tags)
        if self.node_class:
            d["node_class"] = list(self.node_class)
        return d


def _glob_covers(pattern: str, other: str | None) -> bool:
    if other is None:
        return False
    if pattern == "*" or pattern == other:
        return True
    return not _GLOB.search(other) and fnmatch.fnmatchcase(other, pattern)


@dataclass(frozen=True)
class Route:
    """One ``[[routes]]`` entry."""

    name: str
    match: Match
    providers: tuple[str, ...]
    shadow: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    """``shadow_rate``, ``stage``, ``canary_weight``, ``queue_timeout`` when given."""
    line: int | None = None

    def settings_update(self) -> dict[str, Any]:
        """The top-level settings this route replaces (provider, fallbacks, shadow, ...)."""
        return {"provider": self.providers[0], "fallbacks": list(self.providers[1:]), "shadow": self.shadow,
                "shadow_rate": 0.0, "stage": None, **self.options}

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "match": self.match.describe(), "providers": list(self.providers)}
        if self.shadow:
            d["shadow"] = self.shadow
        d.update(self.options)
        return d


@dataclass(frozen=True)
class RouteChoice:
    """The route a job takes and why (``route`` None: the default route)."""

    route: Route | None
    reason: str

    @property
    def name(self) -> str:
        return self.route.name if self.route else DEFAULT_ROUTE


def match_route(routes: Sequence[Route], request: JobRequest) -> RouteChoice:
    """The first route whose match fits ``request``; the default route when none does."""
    for route in routes:
        why = route.match.test(request)
        if why is not None:
            return RouteChoice(route, why)
    return RouteChoice(None, "no route matches: the default provider chain")


# ------------------------------------------------------------------------------------------------ parsing


def config_lines(path: Path | None) -> tuple[list[int], dict[str, int]]:
    """Line numbers (1-based) of each ``[[routes]]`` header and each ``[providers.NAME]`` header."""
    routes: list[int] = []
    providers: dict[str, int] = {}
    if path is None:
        return routes, providers
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return routes, providers
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if re.match(r"^\[\[\s*routes\s*\]\]", stripped):
            routes.append(number)
            continue
        m = re.match(r"^\[\s*providers\s*\.\s*(?:\"([^\"]+)\"|'([^']+)'|([A-Za-z0-9_-]+))\s*\]", stripped)
        if m:
            providers.setdefault(next(g for g in m.groups() if g), number)
    return routes, providers


def _where(path: Path | None, line: int | None) -> str:
    if path is None:
        return ""
    return f"{path}:{line}: " if line else f"{path}: "


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a name or a non-empty list of names")
    return tuple(value)


def parse_routes(
    raw: Sequence[Any], *, known: Iterable[str], path: Path | None = None,
) -> list[Route]:
    """Check and build the routes; ``known``: the provider instances and types a route may name.

    :class:`ConfigError` names the config file's line for a malformed route, an unknown provider, and a
    route that can never match because an earlier one covers it."""
    known_names = set(known)
    lines, _ = config_lines(path)
    routes: list[Route] = []
    for i, item in enumerate(raw):
        line = lines[i] if i < len(lines) else None
        where = _where(path, line) + f"route {i + 1}"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: a [[routes]] entry must be a table")
        name = item.get("name", f"route-{i + 1}")
        where = _where(path, line) + f"route {name!r}"
        unknown = set(item) - _ROUTE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(sorted(_ROUTE_KEYS))})")
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name) or name == DEFAULT_ROUTE:
            raise ConfigError(f"{where}: a route name is letters, digits, '_', '-', '.' (and not 'default')")
        if any(r.name == name for r in routes):
            raise ConfigError(f"{where}: a second route named {name!r}")
        spec = item.get("match", {})
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}: match must be a table, e.g. match = {{ template = \"faceswap*\" }}")
        bad = set(spec) - _MATCH_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown match key(s) {', '.join(sorted(bad))} "
                              f"(known: {', '.join(sorted(_MATCH_KEYS))})")
        try:
            template = spec.get("template")
            if template is not None and (not isinstance(template, str) or not template):
                raise ValueError("match.template must be a name or a glob")
            tags = spec.get("tags", {})
            if not isinstance(tags, Mapping) or not all(isinstance(v, str) for v in tags.values()):
                raise ValueError("match.tags must be a table of strings")
            node_class = _strings(spec["node_class"], "match.node_class") if "node_class" in spec else ()
            providers = _strings(item.get("providers"), "providers")
            shadow = item.get("shadow")
            if shadow is not None and (not isinstance(shadow, str) or not shadow):
                raise ValueError("shadow must be a provider name")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for p in (*providers, *([shadow] if shadow else [])):
            if p not in known_names:
                raise ConfigError(f"{where}: no provider {p!r} (known: {', '.join(sorted(known_names)) or 'none'}); "
                                  "name a [providers.NAME] table or a provider type")
        if len(set(providers)) != len(providers):
            raise ConfigError(f"{where}: a provider is named twice in providers")
        options = {k: item[k] for k in ("shadow_rate", "stage", "canary_weight", "queue_timeout") if k in item}
        route = Route(name=name, match=Match(template=template, tags=tuple(sorted(tags.items())),
                                             node_class=node_class),
                      providers=providers, shadow=shadow, options=options, line=line)
        for earlier in routes:
            if earlier.match.covers(route.match):
                at = f" (line {earlier.line})" if earlier.line else ""
                raise ConfigError(f"{where}: can never match: route {earlier.name!r}{at} comes first and takes "
                                  f"every job it would ({earlier.match.describe() or 'it matches every job'})")
        routes.append(route)
    return routes
