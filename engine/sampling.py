"""The batched sampler: greedy, temperature / top-k / top-p, and constraint masks.

Greedy rows take an argmax over the whole batch at once; sampled rows are scaled, top-k /
top-p filtered in one sort, and drawn by the exponential race (argmax p / E, E ~ Exp(1)) so
that a seeded request draws its noise from its own torch.Generator and gets the same answer
whatever batch it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmudf.engine.params import SamplingParams


class Sampler:
    """Picks one token per row of a logits batch.

    `sample(logits [N, V] float32, params, generators, allowed)` where `allowed[i]` is None or
    the token ids row i may take. Returns (token ids [N] int64, chosen logprobs [N] or None).
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        allowed: Sequence[list[int] | None],
        want_logprobs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self._apply_constraints(logits, allowed)
        next_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            drawn = self._draw(
                logits[rows],
                [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows],
            )
            next_tokens[rows] = drawn
        logprobs = None
        if want_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None])[:, 0]
        return next_tokens, logprobs

    @staticmethod
    def _apply_constraints(
        logits: torch.Tensor, allowed: Sequence[list[int] | None]
    ) -> torch.Tensor:
        rows = [i for i, a in enumerate(allowed) if a is not None]
        if not rows:
            return logits
        mask = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
        for j, i in enumerate(rows):
            mask[j, allowed[i]] = True
        mask = mask.to(logits.device)
        row_index = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[row_index] = logits[row_index].masked_fill(~mask, float("-inf"))
        return logits

    @staticmethod
    def _draw(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        # logits: [M, V] of the non-greedy rows
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temps[:, None]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
            ranks = torch.arange(vocab, device=device)[None, :]
            drop = ranks >= ks[:, None]
            probs = sorted_logits.softmax(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:  # seeded: a CPU generator, so every device draws the same
                row = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=gen)
                noise[i] = row.to(probs.device)
        return (probs / noise).argmax(dim=-1)
