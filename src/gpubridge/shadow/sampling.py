"""Pure decision objects: which jobs to shadow, whether there is room, when to measure the noise floor, and
which arm of a split gets a job.

They do no I/O and take their randomness (``random.Random``) and time (a ``() -> float`` clock) from the
caller, so they are tested exactly, on a seeded RNG. None of them is thread-safe; they are used from one
event loop.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Sampler", "Admission", "NoiseFloorSampler", "WeightedChoice"]

T = TypeVar("T")
Clock = Callable[[], float]


def _check_rate(rate: float, what: str = "rate") -> float:
    rate = float(rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{what} must be within [0, 1], got {rate!r}")
    return rate


class Sampler:
    """Bernoulli sampling: each call to :meth:`decide` is True with probability ``rate``.

    ``rate`` 0 never samples and 1 always does, without drawing from the RNG.
    """

    def __init__(self, rate: float, rng: random.Random | None = None):
        self.rate = _check_rate(rate)
        self.rng = rng or random.Random()
        self.seen = 0
        self.sampled = 0

    def decide(self) -> bool:
        self.seen += 1
        if self.rate >= 1.0:
            hit = True
        elif self.rate <= 0.0:
            hit = False
        else:
            hit = self.rng.random() < self.rate
        self.sampled += hit
        return hit


class Admission:
    """A bound on in-flight shadows. :meth:`try_acquire` never waits: over the bound it refuses and counts
    the refusal in ``dropped``. Each successful acquire must be paired with one :meth:`release`.
    """

    def __init__(self, max_inflight: int):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight!r}")
        self.max_inflight = max_inflight
        self.inflight = 0
        self.admitted = 0
        self.dropped = 0

    def try_acquire(self) -> bool:
        if self.inflight >= self.max_inflight:
            self.dropped += 1
            return False
        self.inflight += 1
        self.admitted += 1
        return True

    def release(self) -> None:
        if self.inflight <= 0:
            raise RuntimeError("Admission.release() called more often than try_acquire() succeeded")
        self.inflight -= 1


@dataclass
class _FloorState:
    taken: int = 0
    last_at: float | None = None


@dataclass
class NoiseFloorSampler:
    """Decides, per workflow, whether a shadowed job also runs the control a second time (control against
    control, to measure how much outputs differ on the same backend: the noise floor).

    A workflow gets a pair for each of its first ``warmup`` shadowed jobs; after that, a pair when its last
    one is older than ``refresh_s`` (when set), else with probability ``rate``.
    """

    rate: float = 0.05
    warmup: int = 10
    refresh_s: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Clock = time.time
    _state: dict[str, _FloorState] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.rate = _check_rate(self.rate, "noise rate")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")

    def decide(self, workflow: str) -> bool:
        st = self._state.setdefault(workflow, _FloorState())
        now = self.clock()
        if st.taken < self.warmup:
            hit = True
        elif self.refresh_s is not None and (st.last_at is None or now - st.last_at >= self.refresh_s):
            hit = True
        elif self.rate >= 1.0:
            hit = True
        elif self.rate <= 0.0:
            hit = False
        else:
            hit = self.rng.random() < self.rate
        if hit:
            st.taken += 1
            st.last_at = now
        return hit

    def taken(self, workflow: str) -> int:
        st = self._state.get(workflow)
        return st.taken if st else 0


class WeightedChoice(Generic[T]):
    """Picks one of several options with probability proportional to its weight.

    With a ``key`` the pick is a pure function of the key (SHA-256 of it mapped to [0, 1)), so retries of one
    logical job (same idempotency key) land on the same option; without one it draws from the RNG.
    """

    def __init__(self, options: Sequence[tuple[T, float]], rng: random.Random | None = None):
        if not options:
            raise ValueError("WeightedChoice needs at least one option")
        weights = [float(w) for _, w in options]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights!r}")
        total = sum(weights)
        self.options = [o for o, _ in options]
        self.weights = [w / total for w in weights]
        self.rng = rng or random.Random()
        self.counts = [0] * len(self.options)

    @staticmethod
    def unit(key: str) -> float:
        """A uniform number in [0, 1) derived from ``key``."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    def choose(self, key: str | None = None) -> T:
        u = self.unit(key) if key is not None else self.rng.random()
        acc = 0.0
        index = len(self.options) - 1
        for i, w in enumerate(self.weights):
            acc += w
            if u < acc and w > 0:
                index = i
                break
        else:
            # Floating-point remainder: the last option with a positive weight.
            index = max(i for i, w in enumerate(self.weights) if w > 0)
        self.counts[index] += 1
        return self.options[index]
