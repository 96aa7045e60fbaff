"""The TypeScript client's types are generated from a committed copy of the gateway's OpenAPI document; it
must be the document the server serves today (regenerate: ``cd clients/typescript && npm run openapi &&
npm run generate``)."""

from __future__ import annotations

import json
from pathlib import Path

from gpubridge.server.openapi import document
from gpubridge.templates import TemplateRegistry

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "clients" / "typescript" / "openapi.json"


def test_the_committed_openapi_document_is_current():
    templates = TemplateRegistry.load(ROOT / "workflows")
    assert json.loads(SNAPSHOT.read_text()) == json.loads(json.dumps(document(templates=templates)))


def test_the_document_types_each_templates_params():
    doc = document(templates=TemplateRegistry.load(ROOT / "workflows"))
    schemas = doc["components"]["schemas"]
    by_name = schemas["TemplateParamsByName"]["properties"]
    assert set(by_name) == {"model_free_invert", "flux_schnell_t2i", "sdxl_img2img", "wan21_t2v"}
    color = schemas["TemplateParams_model_free_invert"]["properties"]["color"]
    assert (color["type"], color["minimum"], color["maximum"]) == ("integer", 0, 16777215)
    assert schemas["TemplateParams_sdxl_img2img"]["required"] == ["image"]


def test_every_operation_declares_the_error_envelope():
    doc = document()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            errors = {s: r for s, r in op["responses"].items() if int(s) >= 400 and int(s) != 503}
            assert errors, f"{method} {path}"
            for status, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorBody", f"{method} {path} {status}"
