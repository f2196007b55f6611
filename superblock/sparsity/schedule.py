"""Sparsity schedules: constant, linear ramp, cubic ramp (Zhu & Gupta, 2017) over optimizer steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SCHEDULES = ("constant", "linear", "cubic")


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """A sparsity must lie in [0, 1): 1.0 would drop every tile."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (fraction of tiles set to zero), got {value}: e.g. 0.9")
    return float(value)


@dataclass(frozen=True)
class SparsitySchedule:
    """Sparsity as a function of the optimizer step.

    constant: `final` from step 0. linear / cubic: `initial` until `start_step`, then a ramp to `final` over
    `ramp_steps` steps (cubic: s_t = s_f + (s_i - s_f) * (1 - t)^3, fast pruning early, gentle at the end).
    """

    final: float
    kind: str = "constant"
    initial: float = 0.0
    start_step: int = 0
    ramp_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown sparsity schedule {self.kind!r}: use one of {SCHEDULES}")
        check_sparsity(self.final, "sparsity")
        check_sparsity(self.initial, "initial sparsity")
        if self.start_step < 0 or self.ramp_steps < 0:
            raise ValueError(
                f"schedule steps must be >= 0, got start_step={self.start_step}, ramp_steps={self.ramp_steps}"
            )
        if self.kind != "constant" and self.ramp_steps == 0:
            raise ValueError(f"a {self.kind} schedule needs ramp_steps > 0 (number of optimizer steps of the ramp)")

    @property
    def end_step(self) -> int:
        """The first step at the final sparsity."""
        return self.start_step + (self.ramp_steps if self.kind != "constant" else 0)

    def value(self, step: int) -> float:
        if self.kind == "constant":
            return self.final
        t = min(max((step - self.start_step) / self.ramp_steps, 0.0), 1.0)
        if self.kind == "linear":
            return self.initial + (self.final - self.initial) * t
        return self.final + (self.initial - self.final) * (1.0 - t) ** 3

    def to_dict(self) -> dict:
        return asdict(self)
