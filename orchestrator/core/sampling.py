"""Sampling options of a turn's answer (OpenAI's ``temperature``, ``top_p``, ``seed``, penalties, ``stop``).

The plan (which calls, with which arguments) is always decoded greedily under the command grammar:
routing must not depend on a dice roll. The options apply to the *answer text*: the answer after the
calls, and a reply the router sent straight to a plain answer. ``Sampling()`` (the default) is greedy
decoding, the server's behaviour when a request sets none of them.

Sampling under a grammar: the candidates are the nucleus (the most likely tokens whose probability
adds up to ``top_p``) of the penalised, temperature-scaled distribution, taken in the order of their
Gumbel-perturbed log-probabilities; the first one the grammar allows is the token. That is an exact
draw from the nucleus restricted to the allowed tokens (the Gumbel-max trick); when the nucleus holds
no allowed token, the most likely allowed token is taken, as in greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MAX_CANDIDATES = 4096  # nucleus members tried before falling back to the greedy choice


@dataclass(frozen=True)
class Sampling:
    """How the answer's tokens are chosen. ``temperature`` 0 = greedy; ``seed`` makes a sampled answer
    reproducible; penalties as OpenAI's (``presence``: once a token appeared, ``frequency``: per
    appearance); ``stop``: the answer ends before the first of these strings."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def changes_tokens(self) -> bool:
        """Whether decoding differs from greedy (``stop`` alone only cuts the text afterwards)."""
        return not self.greedy or bool(self.presence_penalty or self.frequency_penalty)

    def sampler(self) -> Sampler | None:
        """A sampler for one decoding pass, or None when the pass is plain greedy decoding."""
        return Sampler(self) if self.changes_tokens else None

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop sequence, and whether one was found."""
        ends = [i for i in (text.find(s) for s in self.stop if s) if i >= 0]
        return (text[:min(ends)], True) if ends else (text, False)


class Sampler:
    """Chooses the tokens of one decoding pass (penalties, temperature, nucleus, seeded draws)."""

    def __init__(self, options: Sampling) -> None:
        import torch

        self.options = options
        self.generator = torch.Generator()
        if options.seed is not None:
            self.generator.manual_seed(int(options.seed) % (2**63))
        else:
            self.generator.seed()

    def adjust(self, scores: Any, reply: Sequence[int]) -> Any:
        """The logits after OpenAI's presence and frequency penalties for the tokens of ``reply``."""
        import torch

        o = self.options
        if not reply or not (o.presence_penalty or o.frequency_penalty):
            return scores
        ids, counts = torch.unique(torch.tensor(list(reply), device=scores.device), return_counts=True)
        scores = scores.clone()
        scores[ids] -= o.frequency_penalty * counts.to(scores.dtype) + o.presence_penalty
        return scores

    def pick(self, scores: Any, allowed: Callable[[int], bool]) -> int | None:
        """A token drawn from the nucleus among those ``allowed`` (None: the nucleus holds none; and
        with temperature 0, the most likely allowed one among the first ``MAX_CANDIDATES``)."""
        import torch

        o = self.options
        if o.greedy:
            order = torch.topk(scores, min(MAX_CANDIDATES, scores.shape[0])).indices.tolist()
            return next((t for t in order if allowed(t)), None)
        logp = torch.log_softmax(scores.float().cpu() / o.temperature, dim=-1)
        top = torch.topk(logp, min(MAX_CANDIDATES, logp.shape[0]))
        probs = top.values.exp()
        keep = int((torch.cumsum(probs, 0) - probs < o.top_p).sum().clamp(min=1))
        values, ids = top.values[:keep], top.indices[:keep]
        gumbel = -torch.log(-torch.log(torch.rand(keep, generator=self.generator).clamp(1e-20, 1.0)))
        for k in torch.argsort(values + gumbel, descending=True).tolist():
            if allowed(int(ids[k])):
                return int(ids[k])
        return None
