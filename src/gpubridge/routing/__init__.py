"""Routing: ordered rules that send each job to its own provider chain (:mod:`.rules`, pure), and the
runner that applies them (:mod:`.runner`). :func:`gpubridge.connect` builds it from ``[[routes]]``."""

from .rules import DEFAULT_ROUTE, Match, Route, RouteChoice, config_lines, match_route, parse_routes
from .runner import RouterRunner

__all__ = ["DEFAULT_ROUTE", "Match", "Route", "RouteChoice", "RouterRunner", "config_lines", "match_route",
           "parse_routes"]
