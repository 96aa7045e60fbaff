"""Routes as a pure decision, and the checks made on them at start."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpubridge.errors import ConfigError
from gpubridge.models import JobRequest, Workflow
from gpubridge.routing import Match, Route, match_route, parse_routes

ROOT = Path(__file__).resolve().parents[2]
WF = Workflow.load(ROOT / "workflows" / "model_free_invert.json")
KNOWN = {"local", "modal", "runpod", "runpod-faceswap", "modal-faceswap", "runpod-image"}


def req(template: str | None = None, **tags: str) -> JobRequest:
    return JobRequest(workflow=WF, template=template, template_version="v1" if template else None, tags=tags)


def routes(*items: dict) -> list[Route]:
    return parse_routes(list(items), known=KNOWN)


def test_the_first_matching_route_wins_and_says_why():
    rs = routes(
        {"name": "faceswap", "match": {"template": "faceswap*"}, "providers": ["modal-faceswap", "runpod-faceswap"]},
        {"name": "vip", "match": {"tags": {"tier": "vip"}}, "providers": ["modal"]},
        {"name": "inverts", "match": {"node_class": "ImageInvert"}, "providers": ["runpod-image"]},
    )
    choice = match_route(rs, req("faceswap_v2", tier="vip"))
    assert choice.name == "faceswap" and choice.reason == "template 'faceswap_v2' matches 'faceswap*'"
    assert match_route(rs, req("flux", tier="vip")).name == "vip"
    inverts = match_route(rs, req("flux"))
    assert inverts.name == "inverts" and "ImageInvert" in inverts.reason
    other = JobRequest(workflow={"1": {"class_type": "EmptyImage", "inputs": {}}})
    none = match_route(rs, other)
    assert none.route is None and none.name == "default"


def test_every_condition_of_a_match_must_hold():
    m = Match(template="flux*", tags=(("tier", "vip"), ("region", "eu-*")), node_class=("ImageInvert",))
    assert m.test(req("flux_t2i", tier="vip", region="eu-west")) is not None
    assert m.test(req("flux_t2i", tier="vip", region="us-east")) is None
    assert m.test(req("flux_t2i", tier="vip")) is None
    assert m.test(req(None, tier="vip", region="eu-west")) is None  # no template never matches a template glob
    assert Match().test(req()) == "it matches every job"


@pytest.mark.parametrize(("first", "second", "shadowed"), [
    ({}, {"template": "a"}, True),                                        # a catch-all takes everything
    ({"template": "face*"}, {"template": "faceswap"}, True),
    ({"template": "face*"}, {"template": "face*", "tags": {"t": "1"}}, True),
    ({"template": "face*"}, {"template": "fac*"}, False),                 # fac* is wider than face*
    ({"tags": {"t": "1"}}, {"tags": {"t": "1", "u": "2"}}, True),
    ({"tags": {"t": "1", "u": "2"}}, {"tags": {"t": "1"}}, False),
    ({"node_class": "A"}, {"node_class": ["A", "B"]}, True),
    ({"node_class": ["A", "B"]}, {"node_class": "A"}, False),
    ({"template": "x"}, {"tags": {"t": "1"}}, False),
])
def test_a_route_an_earlier_one_always_takes_is_refused(first, second, shadowed):
    items = [{"name": "one", "match": first, "providers": ["local"]},
             {"name": "two", "match": second, "providers": ["modal"]}]
    if shadowed:
        with pytest.raises(ConfigError, match="route 'two': can never match: route 'one'"):
            routes(*items)
    else:
        assert [r.name for r in routes(*items)] == ["one", "two"]


def test_bad_routes_name_the_config_line(tmp_path: Path):
    path = tmp_path / "gpubridge.toml"
    path.write_text('provider = "local"\n\n[[routes]]\nmatch = { template = "a*" }\nproviders = ["local"]\n\n'
                    '[[routes]]\nname = "b"\nmatch = { template = "ab" }\nproviders = ["nowhere"]\n')
    import tomllib

    raw = tomllib.loads(path.read_text())["routes"]
    with pytest.raises(ConfigError, match=rf"{path}:7: route 'b': no provider 'nowhere'"):
        parse_routes(raw, known=KNOWN, path=path)
    raw[1]["providers"] = ["modal"]
    with pytest.raises(ConfigError, match=rf"{path}:7: route 'b': can never match: route 'route-1' \(line 3\)"):
        parse_routes(raw, known=KNOWN, path=path)
    for bad, words in [({"providers": []}, "providers must be"), ({"providers": ["local"], "mach": {}}, "unknown key"),
                       ({"providers": ["local"], "match": {"templat": "x"}}, "unknown match key"),
                       ({"providers": ["local", "local"]}, "named twice")]:
        with pytest.raises(ConfigError, match=words):
            parse_routes([bad], known=KNOWN)
