"""The HTTP job API, one for every deployment: the Modal app, ``python -m modal_app.serve`` and
``gpubridge serve``. :func:`create_app` serves a :class:`JobBackend`; the wire schema is in
:mod:`gpubridge.server.schema` and the record store in :mod:`gpubridge.server.store`."""

from .app import create_app
from .backend import JobBackend
from .store import JobStore, MemoryStore

__all__ = ["JobBackend", "JobStore", "MemoryStore", "create_app"]
