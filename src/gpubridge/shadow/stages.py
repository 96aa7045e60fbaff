"""The migration stages as configuration: from ``provider`` (the control) to ``shadow`` (the candidate).

==========  ==================================================================================
stage       runner
==========  ==================================================================================
off         the control alone
shadow      :class:`ShadowRunner`: control, plus ``shadow_rate`` of jobs mirrored to the candidate
canary      :class:`SplitRunner`: ``canary_weight`` of jobs to the candidate, the rest to the control
cutover     the candidate alone
==========  ==================================================================================

``stage`` unset means ``shadow`` when ``shadow`` is set and ``shadow_rate`` > 0 (so ``GPUBRIDGE_SHADOW=modal``
with ``GPUBRIDGE_SHADOW_RATE=0.1`` is enough), else ``off``. In the shadow stage a candidate that cannot
be built is logged and left out (the control carries on alone); in canary and cutover it carries traffic,
so its error is raised.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..errors import ConfigError
from ..runner import WorkflowRunner
from .runner import ShadowRunner, SplitRunner
from .settings import Stage
from .store import ShadowSink, open_sink

__all__ = ["resolve_stage", "build_stage_runner", "describe_stage"]

log = logging.getLogger("gpubridge.shadow")


def resolve_stage(settings: Settings) -> Stage:
    """The configured stage, or the one implied by ``shadow``/``shadow_rate`` when none is set."""
    if settings.stage is not None:
        return settings.stage
    return Stage.SHADOW if settings.shadow and settings.shadow_rate > 0 else Stage.OFF


def build_stage_runner(
    settings: Settings,
    make_runner: Callable[[str], WorkflowRunner],
    *,
    sink: ShadowSink | None = None,
    rng: random.Random | None = None,
    group: str | None = None,
) -> WorkflowRunner:
    """The runner for the configured stage. ``make_runner(name)`` builds one provider's runner.

    ``sink`` overrides the SQLite file of ``[shadow_options] db``; ``rng`` overrides ``shadow_options.seed``;
    ``group`` (a route's name) prefixes the records' workflow keys, so the report judges each route apart.
    """
    stage = resolve_stage(settings)
    control, candidate = settings.provider, settings.shadow
    if stage is Stage.OFF:
        return make_runner(control)
    if not candidate:
        raise ConfigError(f"Stage {stage.value!r} needs `shadow`: the provider traffic moves to.")
    if candidate == control:
        raise ConfigError(f"`shadow` and `provider` are both {control!r}: nothing to migrate.")
    opts = settings.shadow_options
    if rng is None:
        rng = random.Random(opts.seed) if opts.seed is not None else random.Random()
    if stage is Stage.CUTOVER:
        return make_runner(candidate)
    if stage is Stage.CANARY:
        w = settings.canary_weight
        return SplitRunner([(make_runner(control), 1.0 - w), (make_runner(candidate), w)], rng=rng)

    primary = make_runner(control)
    try:
        shadow = make_runner(candidate)
    except Exception:
        log.exception("shadow provider %r could not be built; running %r without shadow", candidate, control)
        return primary
    return ShadowRunner(
        primary,
        shadow,
        settings.shadow_rate,
        sink=sink if sink is not None else open_sink(settings),
        timeout=opts.timeout,
        max_inflight=opts.max_inflight,
        noise_rate=opts.noise_rate,
        noise_warmup=opts.noise_warmup,
        noise_refresh_s=opts.noise_refresh_s,
        drain_timeout=opts.drain_timeout,
        compare_workers=opts.compare_workers,
        rng=rng,
        group=group,
    )


def describe_stage(settings: Settings) -> dict[str, Any]:
    """What the configured stage does (``gpubridge shadow stage``)."""
    stage = resolve_stage(settings)
    out: dict[str, Any] = {"stage": stage.value, "control": settings.provider, "candidate": settings.shadow}
    if stage is Stage.SHADOW:
        out["rate"] = settings.shadow_rate
    elif stage is Stage.CANARY:
        out["weight"] = settings.canary_weight
    return out
