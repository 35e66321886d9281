"""What to sample, and the one set of rules sampling parameters obey.

``hetlm generate``, the config's ``sample`` section (so ``hetlm eval`` and ``hetlm serve`` too) and the
server's requests are all checked here, so a bad value is refused with the same message wherever it comes
from. Callers name some parameters their own way (``sample.top_p`` in a config, ``max_tokens`` in the HTTP
API), so a ``SamplingError`` can word its message with the caller's name. No torch here: the config
module imports this one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hetlm.errors import UsageError


class SamplingError(UsageError):
    """A sampling parameter that breaks its rule; ``name`` is the SamplingSettings field."""

    def __init__(self, name: str, rule: str, value: Any = None) -> None:
        self.name, self.rule, self.value = name, rule, value
        super().__init__(self.message())

    def message(self, name: str | None = None) -> str:
        """The message, with the parameter called ``name`` (a config key, an API parameter) if given."""
        got = "" if self.value is None else f", got {self.value!r}"
        return f"{name or self.name} {self.rule}{got}"


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample, checked when built. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    # The text ends just before the first occurrence of any of these.
    stop: tuple[str, ...] = ()
    num_samples: int = 1
    # Keep going after </s> (benchmarks that need an exact number of tokens).
    ignore_eos: bool = False
    use_cache: bool = True

    def __post_init__(self) -> None:
        # Frozen, yet callers may hand in a list: the stored value stays hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        if not self.max_new_tokens >= 1:
            raise SamplingError("max_new_tokens", "must be at least 1", self.max_new_tokens)
        # Written so NaN fails too: it compares false with everything.
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SamplingError("temperature", "must be a finite number >= 0 (0 = greedy)", self.temperature)
        if not self.top_k >= 0:
            raise SamplingError("top_k", "must be >= 0 (0 = off)", self.top_k)
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", "must be in (0, 1]", self.top_p)
        if not self.num_samples >= 1:
            raise SamplingError("num_samples", "must be at least 1", self.num_samples)
        if any(not s for s in self.stop):
            raise SamplingError("stop", "must not contain an empty string")

    @classmethod
    def from_config(cls, sample: Any, **overrides: Any) -> SamplingSettings:
        """Settings from the config's ``sample`` section (a SampleConfig: typed loosely, since config.py imports this
        module); ``overrides`` that are None keep the config's value."""
        values = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample) if f.name in _SETTING_NAMES}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_SETTING_NAMES = {f.name for f in dataclasses.fields(SamplingSettings)}
