"""Typed settings of the migration stages (they live in :mod:`gpubridge.config`, re-exported here)."""

from __future__ import annotations

from ..config import ShadowOptions, ShadowThresholds, Stage, default_db_path

__all__ = ["Stage", "ShadowOptions", "ShadowThresholds", "default_db_path"]
