"""Sampling parameters of one request, with vLLM's names, defaults and validation."""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Most top log-probabilities a request may ask for, per token (vLLM's default `max_logprobs`).
MAX_LOGPROBS = 20
# Below this temperature sampling is greedy (argmax), as in vLLM.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the completion of one request.

    Field names, defaults and meanings follow `vllm.SamplingParams`. Validation raises `ValueError`
    with a message fit to show a user. After `__post_init__`: `stop` and `stop_token_ids` are
    tuples, `top_k` is 0 when off (-1 is accepted and normalised to 0), and a greedy request
    (temperature ~ 0) has top_p=1, top_k=0, min_p=0 so the sampler can skip those filters.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | tuple[str, ...] | None = None
    stop_token_ids: list[int] | tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._normalise()
        self._verify_sampling()
        self._verify_penalties()
        self._verify_lengths()
        self._verify_logprobs()
        if self.is_greedy:
            # Filters change nothing under argmax; clearing them lets the sampler skip them.
            object.__setattr__(self, "top_p", 1.0)
            object.__setattr__(self, "top_k", 0)
            object.__setattr__(self, "min_p", 0.0)

    @property
    def is_greedy(self) -> bool:
        """True when the request samples by argmax."""
        return self.temperature < SAMPLING_EPS

    def _normalise(self) -> None:
        """Bring list/str/None variants to one canonical form each."""
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop)
        if any(not isinstance(s, str) or s == "" for s in stop):
            raise ValueError("stop cannot contain an empty string or a non-string.")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.logit_bias is not None:
            # JSON object keys arrive as strings from the OpenAI API.
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f"logit_bias must map token ids to numbers, got {e}.") from e
            object.__setattr__(self, "logit_bias", bias)

    def _verify_sampling(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}.")

    def _verify_penalties(self) -> None:
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(
                    f"logit_bias for token {token_id} must be in [-100, 100], got {bias}."
                )

    def _verify_lengths(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(
                f"min_tokens must be greater than or equal to 0, got {self.min_tokens}."
            )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}."
            )

    @functools.cached_property
    def sampler_values(self) -> tuple[float, ...]:
        """The sampler's per-request inputs, in `step_input.SAMPLER_VALUES` order: computed
        once, since the batch builder reads them for every request at every step."""
        greedy = self.temperature <= SAMPLING_EPS
        return (
            self.min_tokens,
            max(self.top_k or 0, 0),
            0.0 if greedy else self.temperature,
            self.top_p,
            self.min_p,
            self.presence_penalty,
            self.frequency_penalty,
            self.repetition_penalty,
        )

    def _verify_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}.")
