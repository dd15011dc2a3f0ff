"""Small prediction helpers shared by the demo, CLI, tests and evaluation.

:func:`next_token_logprobs` (and :func:`next_token_logprobs_batch`) give the next-token
distribution after a prompt; :func:`target_logprob` is the CounterFact comparison quantity of
one prompt and target; :func:`target_logprobs` computes it for many pairs in padded batches
(evaluation of thousands of records); :func:`target_token_scores` gives the same pairs'
per-token log-probabilities and argmax predictions (the teacher-forced token accuracy of zsRE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from rome_lens._typing import Model
from rome_lens.models import access
from rome_lens.requests import target_tokens


@torch.no_grad()
def next_token_logprobs(model: Model, prompt: str) -> torch.Tensor:
    """Log-probabilities of the next token after ``prompt`` (only the last position decoded)."""
    tokens = access.to_tokens(model, prompt)[None]
    resid = access.final_residual(model, tokens)
    return access.decode_residual(model, resid[0, -1]).log_softmax(-1)


@torch.no_grad()
def next_token_logprobs_batch(
    model: Model, prompts: Sequence[str], batch_size: int = 16
) -> Float[torch.Tensor, "n_prompts d_vocab"]:
    """:func:`next_token_logprobs` of many prompts, run as right-padded batches.

    Example:
        >>> logp = next_token_logprobs_batch(model, ["Paris is in", "Rome is the capital of"])
        >>> logp.shape[0]
        2
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        ids = [access.to_tokens(model, p) for p in prompts[start : start + batch_size]]
        tokens = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long,
                             device=ids[0].device)
        mask = torch.zeros_like(tokens)
        for i, row in enumerate(ids):  # right padding: no real position follows a pad
            tokens[i, : len(row)] = row
            mask[i, : len(row)] = 1
        resid = access.final_residual(model, tokens, attention_mask=mask)
        last = torch.tensor([len(row) - 1 for row in ids], device=resid.device)
        rows = resid[torch.arange(len(ids), device=resid.device), last]
        out.append(access.decode_residual(model, rows).float().log_softmax(-1))
    return torch.cat(out)


def top_tokens(model: Model, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities.

    Example:
        >>> top_tokens(model, "The Eiffel Tower is located in the city of", k=3)
        [(..., ...), (..., ...), (..., ...)]

        On gemma-3-270m this is ``[(' Paris', 0.81), (' Lyon', 0.06), (' ', 0.01)]``.
    """
    logp = next_token_logprobs(model, prompt)
    values, indices = logp.topk(k)
    assert model.tokenizer is not None
    return [
        (str(model.tokenizer.decode([int(i)])), float(v.exp()))
        for v, i in zip(values, indices, strict=True)
    ]


@torch.no_grad()
def target_logprob(model: Model, prompt: str, target: str) -> float:
    """Mean per-token log-probability of ``target`` (with a leading space) after ``prompt``.

    This is the CounterFact comparison quantity (REFERENCE.md §3): the negative mean NLL.
    """
    prompt_ids = access.to_tokens(model, prompt)
    target_ids = target_tokens(model, target).to(prompt_ids.device)
    tokens = torch.cat([prompt_ids, target_ids])[None]
    access.check_fits(model, tokens.shape[1])
    resid = access.final_residual(model, tokens)
    n = prompt_ids.shape[0]
    positions = torch.arange(n - 1, n - 1 + target_ids.shape[0], device=tokens.device)
    logp = access.decode_residual(model, resid[0, positions]).log_softmax(-1)
    return float(logp.gather(-1, target_ids[:, None]).mean())


def target_logprobs(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> list[float]:
    """:func:`target_logprob` of many ``(prompt, target)`` pairs, in padded batches.

    The means of :func:`target_token_scores`: each pair is tokenised exactly as
    :func:`target_logprob` does and teacher-forced as one right-padded row.

    Args:
        model: the model, edited or not.
        pairs: ``(prompt, target)`` pairs; a repeated pair is computed once.
        batch_size: rows per forward pass (and rows per unembedding chunk).
        progress: show a tqdm bar over the pairs.

    Returns:
        The mean per-token log-probability of each target, in the order of ``pairs``; equal to
        :func:`target_logprob` up to float rounding.

    Raises:
        ValueError: ``batch_size`` below 1.
        InvalidRequestError: an empty target.
        PromptTooLongError: a prompt and target longer than the context window.

    Example:
        >>> lps = target_logprobs(model, [("Alice lives in", "Rome"), ("Bob is", "Oslo")])
        >>> abs(lps[0] - target_logprob(model, "Alice lives in", "Rome")) < 1e-4
        True
    """
    scores = target_token_scores(model, pairs, batch_size=batch_size, progress=progress)
    return [s.mean_logprob for s in scores]


@dataclass(frozen=True, repr=False)
class TargetTokens:
    """Teacher-forced predictions at the positions of a target's tokens after a prompt.

    Attributes:
        ids: the target's token ids (as :func:`rome_lens.requests.target_tokens` gives them).
        logprobs: ``log p(ids[i] | prompt, ids[:i])`` of each token.
        predicted: the most likely token (argmax) at each of those positions.
    """

    ids: Int[torch.Tensor, " n"]
    logprobs: Float[torch.Tensor, " n"]
    predicted: Int[torch.Tensor, " n"]

    @property
    def mean_logprob(self) -> float:
        """The mean per-token log-probability (the CounterFact comparison quantity)."""
        return float(self.logprobs.mean())

    def __repr__(self) -> str:
        hits = int((self.predicted == self.ids).sum())
        return (
            f"TargetTokens({self.ids.shape[0]} tokens, mean log-prob {self.mean_logprob:.3f}, "
            f"argmax hits {hits}/{self.ids.shape[0]})"
        )


def target_token_scores(
    model: Model,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> list[TargetTokens]:
    """Per-token log-probabilities and argmax predictions of many ``(prompt, target)`` pairs.

    Each pair is tokenised as :func:`target_logprob` does (the prompt with BOS, the target
    without) and teacher-forced in a right-padded row (pairs of one prompt share a row where
    the tokens fed are the same, e.g. one-token targets), and only the rows that predict a
    target token are decoded: the unembedding of a 262k vocabulary at every position would cost
    more than the forward pass. Pairs are sorted by length so that a batch holds rows of
    similar length; the attention mask keeps padding out of every real position.

    Args:
        model: the model, edited or not.
        pairs: ``(prompt, target)`` pairs; a repeated pair is computed once.
        batch_size: rows per forward pass (and rows per unembedding chunk).
        progress: show a tqdm bar over the pairs.

    Returns:
        One :class:`TargetTokens` (on the CPU) per pair, in the order of ``pairs``.

    Raises:
        ValueError: ``batch_size`` below 1.
        InvalidRequestError: an empty target.
        PromptTooLongError: a prompt and target longer than the context window.

    Example:
        >>> scores = target_token_scores(model, [("Alice lives in", "Rome")])
        >>> scores[0].ids.shape == scores[0].logprobs.shape == scores[0].predicted.shape
        True
        >>> scores[0]
        TargetTokens(... tokens, mean log-prob ..., argmax hits .../...)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    unique = list(dict.fromkeys(pairs))
    rows, reads = _share_rows(_tokenise_pairs(model, unique))
    order = sorted(range(len(rows)), key=lambda i: -_row_length(rows[i]))
    by_row: dict[int, list[int]] = {}
    for pair, (row, _) in enumerate(reads):
        by_row.setdefault(row, []).append(pair)
    values: dict[int, TargetTokens] = {}
    with tqdm(total=len(unique), desc="target log-probs", unit="pair", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            pair_ids = [p for r in chunk for p in by_row[r]]
            local = {r: b for b, r in enumerate(chunk)}
            batch_reads = [(local[reads[p][0]], reads[p][1]) for p in pair_ids]
            scores = _batch_token_scores(model, [rows[i] for i in chunk], batch_reads, batch_size)
            values.update(zip(pair_ids, scores, strict=True))
            bar.update(len(pair_ids))
    index = {pair: i for i, pair in enumerate(unique)}
    return [values[index[pair]] for pair in pairs]


_Row = tuple[Int[torch.Tensor, " prompt"], Int[torch.Tensor, " target"]]
_Read = tuple[int, Int[torch.Tensor, " target"]]


def _row_length(row: _Row) -> int:
    return int(row[0].shape[0] + row[1].shape[0])


def _tokenise_pairs(model: Model, pairs: Sequence[tuple[str, str]]) -> list[_Row]:
    """Prompt ids (with BOS) and target ids of each pair; each prompt tokenised once."""
    prompts: dict[str, torch.Tensor] = {}
    rows = []
    for prompt, target in pairs:
        if prompt not in prompts:
            prompts[prompt] = access.to_tokens(model, prompt)
        prompt_ids = prompts[prompt]
        row = (prompt_ids, target_tokens(model, target).to(prompt_ids.device))
        access.check_fits(model, _row_length(row), what=repr(prompt[:60]))
        rows.append(row)
    return rows


def _share_rows(pairs: list[_Row]) -> tuple[list[_Row], list[_Read]]:
    """Rows to run and, per pair, ``(row, target ids)`` to read from it.

    A pair's target ``t`` is read from a row of the same prompt whose target starts with
    ``t[:-1]``: the row feeds the same tokens up to the last position that predicts ``t``, so
    the residuals there are the pair's own (a one-token target is read from any row of its
    prompt). Longer targets are placed first, so CounterFact's ``(prompt, new)`` and
    ``(prompt, true)`` pairs with one-token targets share one forward row.
    """
    rows: list[_Row] = []
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    reads: list[_Read | None] = [None] * len(pairs)
    for i in sorted(range(len(pairs)), key=lambda i: -int(pairs[i][1].shape[0])):
        prompt_ids, target_ids = pairs[i]
        head = target_ids[:-1]
        key = tuple(prompt_ids.tolist())
        for r in by_prompt.get(key, []):
            if torch.equal(rows[r][1][: head.shape[0]], head):  # shorter rows: shapes differ
                reads[i] = (r, target_ids)
                break
        else:
            by_prompt.setdefault(key, []).append(len(rows))
            reads[i] = (len(rows), target_ids)
            rows.append(pairs[i])
    return rows, [read for read in reads if read is not None]


@torch.no_grad()
def _batch_token_scores(
    model: Model, rows: list[_Row], reads: list[_Read], decode_rows: int
) -> list[TargetTokens]:
    """Per-token scores of each read ``(row in rows, target ids)`` from one padded forward.

    Args:
        model: the model.
        rows: ``(prompt ids, target ids)`` of each row run.
        reads: the targets read, each from the row whose index it gives (its target ids are
            those of the row up to the read's last token, see :func:`_share_rows`).
        decode_rows: most residual vectors unembedded at once (bounds the
            ``[rows, d_vocab]`` logits).
    """
    device = rows[0][0].device
    width = max(_row_length(row) for row in rows)
    # Any valid id does for padding: the attention mask hides it, and with right padding no
    # real position comes after it.
    tokens = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(tokens)
    for i, (prompt_ids, target_ids) in enumerate(rows):
        n, t = int(prompt_ids.shape[0]), int(target_ids.shape[0])
        tokens[i, :n] = prompt_ids
        tokens[i, n : n + t] = target_ids
        mask[i, : n + t] = 1
    row_index, positions = [], []
    for i, target_ids in reads:
        n, t = int(rows[i][0].shape[0]), int(target_ids.shape[0])
        # The residual at position p predicts token p + 1: the target's rows start one early.
        row_index.append(torch.full((t,), i, dtype=torch.long, device=device))
        positions.append(torch.arange(n - 1, n - 1 + t, device=device))
    resid = access.final_residual(model, tokens, attention_mask=mask)
    wanted = resid[torch.cat(row_index), torch.cat(positions)]
    ids = torch.cat([target_ids.to(device) for _, target_ids in reads])
    token_logp, predicted = [], []
    for s in range(0, ids.shape[0], decode_rows):
        logp = access.decode_residual(model, wanted[s : s + decode_rows]).log_softmax(-1)
        token_logp.append(logp.gather(-1, ids[s : s + decode_rows, None])[:, 0])
        predicted.append(logp.argmax(-1))
    lengths = [int(target_ids.shape[0]) for _, target_ids in reads]
    parts = zip(
        ids.cpu().split(lengths),
        torch.cat(token_logp).cpu().split(lengths),
        torch.cat(predicted).cpu().split(lengths),
        strict=True,
    )
    return [TargetTokens(i, lp, p) for i, lp, p in parts]
