"""Workflow templates: named, typed, versioned workflows.

A template is an API-format workflow and a manifest beside it declaring parameters (name, type, default,
bounds, description, and the ``NODE.input`` each binds to), the models it needs and its outputs::

    from gpubridge.templates import TemplateRegistry

    registry = TemplateRegistry.load("workflows")
    request = registry.request("model_free_invert", {"color": 255})    # a JobRequest
    # or, with the default folder ($GPUBRIDGE_TEMPLATES, else ./workflows):
    request = JobRequest(template="model_free_invert", params={"color": 255})

A bad parameter raises :class:`~gpubridge.errors.ParamInvalid` naming it, before any backend is called.
Modules: :mod:`.params` (types, checks, JSON Schema), :mod:`.template` (manifest, version, rendering),
:mod:`.registry` (a folder of them), :mod:`.propose` (a manifest proposed for a workflow).
"""

from .params import PARAM_TYPES, Param
from .registry import DEFAULT_DIR, TEMPLATES_ENV, TemplateRegistry, default_registry
from .template import Output, Rendered, Template

__all__ = [
    "DEFAULT_DIR",
    "PARAM_TYPES",
    "TEMPLATES_ENV",
    "Output",
    "Param",
    "Rendered",
    "Template",
    "TemplateRegistry",
    "default_registry",
]
