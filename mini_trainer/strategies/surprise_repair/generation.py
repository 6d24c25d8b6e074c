"""Surprisal Sandwich generation: "novel but coherent" text from a causal language model.

Two logits processors with the Hugging Face `LogitsProcessor` call signature
`processor(input_ids, scores) -> scores` (so they also go into `transformers`'
`model.generate(logits_processor=LogitsProcessorList([...]))`), both placed by the fraction
of new tokens generated so far, f = (len(input_ids) - prompt_length) / max_new_tokens:

- `AntiTopK(alpha=10, k=5, window=(0.45, 0.70))`: for f in [0.45, 0.70), subtract alpha from
  the k highest logits: the middle of the text is pushed off the obvious path (surprise).
- `CoherenceBoost(small_lm, mu=0.4, start=0.70)`: for f >= 0.70, add mu x a small model's
  logits for the same context: the tail is pulled back to what a plain model finds likely.

`surprisal_sandwich_generate(model, prompt_ids, ...)` samples with both (top-p, temperature)
from any callable `ids (B, T) -> logits (B, T, V)` (or an object with `.logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...utils import check_int, check_number

__all__ = ["AntiTopK", "CoherenceBoost", "surprisal_sandwich_generate", "top_p_sample"]


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


class _Placed:
    """A processor active on a fraction of the new tokens; `begin(prompt_length,
    max_new_tokens)` places it (the generate function calls it for you)."""

    def __init__(self, prompt_length: int | None, max_new_tokens: int | None) -> None:
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens

    def begin(self, prompt_length: int, max_new_tokens: int) -> None:
        check_int("prompt_length", prompt_length, minimum=0)
        check_int("max_new_tokens", max_new_tokens, minimum=1)
        self.prompt_length, self.max_new_tokens = prompt_length, max_new_tokens

    def fraction(self, input_ids: torch.Tensor) -> float:
        if self.prompt_length is None or self.max_new_tokens is None:
            raise RuntimeError(
                f"{type(self).__name__} is not placed: pass prompt_length= and max_new_tokens=, or call begin()"
            )
        return (input_ids.shape[-1] - self.prompt_length) / self.max_new_tokens


class AntiTopK(_Placed):
    """Subtract `alpha` from the `k` largest logits while the fraction of new tokens is in
    `window` = [start, end)."""

    def __init__(self, alpha: float = 10.0, k: int = 5, window: Sequence[float] = (0.45, 0.70),
                 prompt_length: int | None = None, max_new_tokens: int | None = None) -> None:
        check_number("AntiTopK.alpha", alpha)
        check_int("AntiTopK.k", k, minimum=1)
        if len(window) != 2 or not 0.0 <= window[0] <= window[1] <= 1.0:
            raise ValueError(f"AntiTopK.window must be (start, end) with 0 <= start <= end <= 1; got {window!r}")
        super().__init__(prompt_length, max_new_tokens)
        self.alpha, self.k, self.window = float(alpha), k, (float(window[0]), float(window[1]))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        f = self.fraction(input_ids)
        if not self.window[0] <= f < self.window[1]:
            return scores
        k = min(self.k, scores.shape[-1])
        top = torch.topk(scores, k, dim=-1).indices
        return scores.scatter_add(-1, top, torch.full(top.shape, -self.alpha, dtype=scores.dtype, device=scores.device))


class CoherenceBoost(_Placed):
    """Add `mu` x `small_lm`'s next-token logits from the fraction `start` of new tokens on.
    A Hugging Face model is run incrementally with its KV cache (`past_key_values`); any
    other callable `ids -> logits` sees the whole context each time."""

    def __init__(self, small_lm: Callable[..., Any], mu: float = 0.4, start: float = 0.70,
                 prompt_length: int | None = None, max_new_tokens: int | None = None) -> None:
        if not callable(small_lm):
            raise TypeError(f"CoherenceBoost needs a callable small model; got {small_lm!r}")
        check_number("CoherenceBoost.mu", mu)
        check_number("CoherenceBoost.start", start)
        super().__init__(prompt_length, max_new_tokens)
        self.small_lm, self.mu, self.start = small_lm, float(mu), float(start)
        self._past: Any = None
        self._cached_ids: torch.Tensor | None = None  # the tokens the cache holds
        self.calls = 0

    def begin(self, prompt_length: int, max_new_tokens: int) -> None:
        super().begin(prompt_length, max_new_tokens)
        self._past, self._cached_ids = None, None

    @torch.no_grad()
    def _small_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        uses_cache = hasattr(self.small_lm, "config") and getattr(self.small_lm.config, "use_cache", False)
        if not uses_cache:
            return _logits(self.small_lm(input_ids))[:, -1]
        cached = self._cached_ids
        # The cache is used only for the very sequences it was built from, extended (beam
        # search reorders rows, a new generate call starts other text: then it is rebuilt).
        # Left padding is not supported: no attention mask reaches the small model.
        if (
            cached is not None and self._past is not None and cached.shape[0] == input_ids.shape[0]
            and cached.shape[1] < input_ids.shape[1] and torch.equal(input_ids[:, : cached.shape[1]], cached)
        ):
            out = self.small_lm(input_ids=input_ids[:, cached.shape[1] :], past_key_values=self._past, use_cache=True)
        else:
            out = self.small_lm(input_ids=input_ids, use_cache=True)
        self._past, self._cached_ids = out.past_key_values, input_ids.clone()
        return out.logits[:, -1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.fraction(input_ids) < self.start:
            return scores
        small = self._small_logits(input_ids).to(scores.dtype)
        return scores + self.mu * small[..., : scores.shape[-1]]


def top_p_sample(logits: torch.Tensor, top_p: float = 0.9, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row: nucleus sampling at `temperature`."""
    probs = torch.softmax(logits.float() / max(temperature, 1e-6), dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the most likely token
    sorted_probs = sorted_probs * keep
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1, generator=generator)
    return order.gather(-1, choice)


@torch.no_grad()
def surprisal_sandwich_generate(
    model: Callable[[torch.Tensor], Any],
    prompt_ids: torch.Tensor,
    max_new_tokens: int = 64,
    top_p: float = 0.9,
    temperature: float = 0.8,
    anti_topk: AntiTopK | None = None,
    coherence: CoherenceBoost | None = None,
    small_lm: Callable[..., Any] | None = None,
    sandwich: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt + `max_new_tokens` sampled tokens, shape (B, T + max_new_tokens).

    With `sandwich` (default) the middle is pushed by `anti_topk` (default `AntiTopK()`) and,
    when a `small_lm` or `coherence` is given, the tail is pulled by it; `sandwich=False`
    samples plainly, for comparison. `model(ids)` returns logits (B, T, V)."""
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_number("top_p", top_p, positive=True)
    check_number("temperature", temperature, positive=True)
    ids = prompt_ids if prompt_ids.ndim == 2 else prompt_ids.unsqueeze(0)
    processors: list[_Placed] = []
    if sandwich:
        processors.append(anti_topk or AntiTopK())
        if coherence is not None or small_lm is not None:
            processors.append(coherence or CoherenceBoost(small_lm))
    for processor in processors:
        processor.begin(ids.shape[-1], max_new_tokens)
    for _ in range(max_new_tokens):
        scores = _logits(model(ids))[:, -1]
        for processor in processors:
            scores = processor(ids, scores)
        ids = torch.cat([ids, top_p_sample(scores, top_p, temperature, generator)], dim=-1)
    return ids
