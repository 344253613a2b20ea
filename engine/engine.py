"""The inference engine: a KV cache, a batch of independent rows decoded together, and tools.

Three layers, each usable on its own, for every model family (engine/models/):

* the model's decode cache (`model.new_cache`, engine/kv_cache.py `DecodeCache`): for GPT and
  GPT-2 a `KVCache` -- preallocated (layers, rows, kv_heads, max_len, head_dim) keys and values
  (heads first, the layout attention reads) with a length per row; the hybrid adds each linear
  layer's conv window and recurrent state per row. A forward runs over a contiguous range of
  rows (`cache.rows(start, stop)`), so a prompt is prefilled into one row alone, copied into as
  many rows as samples are wanted, and then decoded together with rows that started earlier
  and sit at other lengths.
* `Batch` -- the scheduler core an engine worker drives. `add` prefills a prompt and makes its
  row(s) join; `step` runs one forward over every active row and returns one token per row;
  finished rows leave and free their slot. Active rows always occupy slots 0..n-1 (a leaving
  row's slot is refilled by the last row), so a step is one forward over one slice of the cache,
  whatever the mix of prompts, lengths and sampling settings.
* `Engine` -- nanochat's interface on top: `generate` (a stream of token columns) and
  `generate_batch` (whole sequences) for one prompt and `num_samples` rows sharing its prefill.

Forwards go through `engine.models.gpt_inference.InferenceForward` (GPT's math in a third of the ops, for
devices that compute in fp32) or `GPT.forward` under autocast (mixed precision).

A row's prompt is prefilled up to its last token, which becomes the row's first decode input.
That keeps every step uniform -- each active row feeds exactly one token -- and a one-token
prompt needs no prefill at all.

Sampling: every row owns a `torch.Generator` seeded from its own seed and draws one uniform
number per sampled token, in blocks, so its random stream never depends on which other rows
share the batch. The tokens of all rows are then drawn in one batched inverse-CDF step
(`sample_tokens`). Temperature 0 is argmax, which makes cached decoding reproduce
`GPT.generate_naive` token for token.

Host and device: a decode step waits for the device once, when it reads the sampled tokens
(`.tolist()`); whether a row finished is decided on the host from those tokens, so nothing else
comes back. Everything the host sends -- uniforms, token ids after a row changed or a token was
forced -- goes through `_upload`: pinned memory and an asynchronous copy on CUDA, because a
plain `torch.tensor(..., device="cuda")` waits for every kernel queued before it. Step planning
reads only the host's mirror of the cache lengths.

With `static_shapes` (or `cuda_graphs`) decoding runs through `_StaticDecoder`: the active rows
are padded up to a bucket (powers of two up to max_rows) and one forward of fixed shapes per
bucket reads the whole cache under a mask built on the device from the device lengths, so the
same kernels with the same arguments run every step -- what a CUDA graph needs. With
`cuda_graphs` each bucket's forward is captured once and replayed; with `static_shapes` alone
it runs eagerly, which is how a CPU checks that the path gives the tokens eager decoding gives.

Log-probabilities (the OpenAI API's `logprobs`): a row whose `SamplingParams.logprobs` is set
gets, per generated token, the token's log-probability under the model's own distribution --
the log-softmax of the raw logits (temperature 1, no top-k), whatever the row samples with --
and the `logprobs` most likely tokens with theirs (`TokenLogprob`, in `Row.logprobs`). Only rows
that ask pay for it: a step with no such row computes nothing more and reads nothing more from
the device.

Tools (SPEC §9): a row that emits `<|python_start|> expr <|python_end|>` gets the calculator's
result forced in as `<|output_start|> result <|output_end|>`; forced tokens have mask 0 and are
fed to the model like sampled ones.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from engine import calculator
from engine.common import autocast, autodetect_device, compute_dtype
from engine.kv_cache import DecodeCache, KVCache
from engine.models.registry import family_of

if TYPE_CHECKING:
    from engine.models.base import LanguageModel
    from engine.tokenizer import Tokenizer

# Yielded by `Engine.generate` in the column of a row that has already finished.
FINISHED = -1
# The most alternatives a row may ask to see per token (OpenAI's top_logprobs bound).
MAX_TOP_LOGPROBS = 20
# Uniform draws are taken from a row's generator this many at a time: one small tensor op per
# 64 sampled tokens instead of one per token.
UNIFORM_BLOCK = 64
_MASK64 = (1 << 64) - 1


class FinishReason(StrEnum):
    STOP = "stop"  # the row emitted <|assistant_end|> or <|bos|>
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # removed by the caller


# ---- rows and sampling ----------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. max_tokens None = as many as the cache allows."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 42
    # None: no log-probabilities; k >= 0: the chosen token's, and the k most likely tokens'.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (_not_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(
                f"max_tokens must be a positive integer or None, got {self.max_tokens!r}"
            )
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"temperature must be a number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        if self.top_k is not None and (_not_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if _not_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (
            _not_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], "
                f"got {self.logprobs!r}"
            )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the most likely tokens at its position (most
    likely first), all from the log-softmax of the model's raw logits."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class Row:
    """One sequence being generated: its tokens, sampling state, tool state and outcome."""

    tokens: list[int]
    prompt_len: int
    temperature: float
    top_k: int | None
    max_tokens: int
    seed: int
    index: int = 0  # position among the samples of its request
    top_logprobs: int | None = None  # None: no log-probabilities are computed for this row
    # Per generated token (forced ones too), when top_logprobs is not None.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator = field(init=False, repr=False)
    masks: list[int] = field(default_factory=list)  # per generated token: 1 sampled, 0 forced
    num_generated: int = 0
    forced: deque[int] = field(default_factory=deque)
    in_python: bool = False
    python_tokens: list[int] = field(default_factory=list)
    done: bool = False
    finish_reason: FinishReason | None = None
    slot: int = -1
    _uniforms: list[float] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)

    @property
    def output_tokens(self) -> list[int]:
        """The generated tokens (sampled and forced), without the prompt."""
        return self.tokens[self.prompt_len :]

    def next_uniform(self) -> float:
        """The next number in [0, 1) of this row's own random stream."""
        if not self._uniforms:
            block = torch.rand(UNIFORM_BLOCK, generator=self.generator, dtype=torch.float64)
            self._uniforms = block.tolist()[::-1]
        return self._uniforms.pop()


def row_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` of a request seeded with `seed`.

    SplitMix64's output function: neighbouring (seed, index) pairs get unrelated streams, so
    sample 1 of seed 7 is not sample 0 of seed 8.
    """
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SamplingSettings:
    """The sampling settings of a batch's rows as tensors, built once per change of rows.

    Rows at temperature 0 take the argmax. The others sample by inverse CDF over the vocabulary
    in id order: the first token whose cumulative probability exceeds the row's uniform number
    (float64 cumsum, so the tail of a 32k vocabulary keeps its mass). Top-k removes every token
    below the row's k-th largest logit. Nothing depends on the other rows, so a row draws the
    same token whichever rows share its batch.
    """

    def __init__(
        self,
        temperatures: Sequence[float],
        top_ks: Sequence[int | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> None:
        self.all_greedy = all(t == 0 for t in temperatures)
        self.any_greedy = any(t == 0 for t in temperatures)
        ks = [None if k is None else min(k, vocab_size) for k in top_ks]
        limited = [k for k in ks if k is not None]
        # One topk of the largest k serves every row; a row with a smaller k reads its own
        # threshold further up, and a row without top-k gets no threshold.
        self.topk_width = max(limited) if limited else None
        self.kth_index = None
        self.unlimited_rows = None
        if limited and (len(limited) < len(ks) or min(limited) < max(limited)):
            self.kth_index = _upload([[(k or self.topk_width) - 1] for k in ks], torch.long, device)
            if len(limited) < len(ks):
                self.unlimited_rows = _upload([[k is None] for k in ks], torch.bool, device)
        # float64 keeps the tail of a large vocabulary in the CDF; Apple's MPS has no float64.
        self.cdf_dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
        # Greedy rows divide by 1: their sampled token is discarded anyway. Dividing by 1 is
        # exact, so a batch whose temperatures are all 1 (or 0) skips the pass.
        divisors = [t if t > 0 else 1.0 for t in temperatures]
        self.temperature = (
            None
            if all(d == 1.0 for d in divisors)
            else _upload([[d] for d in divisors], torch.float32, device)
        )
        self.greedy_rows = (
            _upload([[t == 0] for t in temperatures], torch.bool, device)
            if self.any_greedy
            else None
        )

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """(B, V) logits and (B, 1) uniforms in [0, 1) -> (B, 1) token ids."""
        if self.all_greedy:
            return logits.max(dim=-1, keepdim=True).indices
        scaled = logits if self.temperature is None else logits / self.temperature
        if self.topk_width is not None:
            top = logits.topk(self.topk_width, dim=-1).values
            kth = top[:, -1:] if self.kth_index is None else top.gather(-1, self.kth_index)
            if self.unlimited_rows is not None:
                kth = kth.masked_fill(self.unlimited_rows, -math.inf)
            scaled = torch.where(logits < kth, -math.inf, scaled)
        cdf = F.softmax(scaled, dim=-1).cumsum(dim=-1, dtype=self.cdf_dtype)
        targets = uniforms.to(self.cdf_dtype) * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, targets, right=True).clamp_(max=logits.size(-1) - 1)
        if self.greedy_rows is None:
            return sampled
        greedy = logits.max(dim=-1, keepdim=True).indices
        return torch.where(self.greedy_rows, greedy, sampled)


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """Per row of (B, V) `logits`: the log-probability of that row's token in `tokens` and the
    `top` most likely tokens with theirs, most likely first.

    The log-softmax of the logits as the model gives them (temperature 1, no top-k): OpenAI
    reports the model's distribution, not the one a row happened to sample from. Computed in
    float32 and read from the device with one copy.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    ids = _upload([[token] for token in tokens], torch.long, logits.device)
    chosen = logp.gather(-1, ids)
    top = min(top, logits.size(-1))
    values, indices = logp.topk(top, dim=-1)
    # One read: ids ride along as float32, exact for any vocabulary under 2**24 tokens.
    read = torch.cat((chosen, values, indices.to(values.dtype)), dim=-1).tolist()
    return [
        TokenLogprob(
            line[0], [(int(i), v) for v, i in zip(line[1 : top + 1], line[top + 1 :], strict=True)]
        )  # fmt: skip
        for line in read
    ]


def sample_tokens(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int | None],
    uniforms: Sequence[float],
) -> list[int]:
    """One token per row of (B, V) `logits`, each row with its own temperature, top-k and
    uniform number in [0, 1) (see `SamplingSettings`)."""
    settings = SamplingSettings(temperatures, top_ks, logits.size(-1), logits.device)
    u = _upload([[x] for x in uniforms], settings.cdf_dtype, logits.device)
    return settings.sample(logits, u).view(-1).tolist()


@dataclass(frozen=True)
class _SpecialIds:
    """The token ids the engine reacts to; None where the tokenizer lacks the token."""

    stop: frozenset[int]
    python_start: int | None
    python_end: int | None
    output_start: int | None
    output_end: int | None

    @classmethod
    def of(cls, tokenizer: Tokenizer | None) -> _SpecialIds:
        if tokenizer is None:
            return cls(frozenset(), None, None, None, None)

        def lookup(name: str) -> int | None:
            try:
                return tokenizer.encode_special(name)
            except ValueError:
                return None

        stop = {tokenizer.get_bos_token_id(), lookup("<|assistant_end|>")} - {None}
        return cls(
            frozenset(stop),
            lookup("<|python_start|>"),
            lookup("<|python_end|>"),
            lookup("<|output_start|>"),
            lookup("<|output_end|>"),
        )

    @property
    def has_tools(self) -> bool:
        return None not in (self.python_start, self.python_end, self.output_start, self.output_end)


# ---- the batch ------------------------------------------------------------------------------


class Batch:
    """Rows decoded together, one token per row per `step`; rows may join and leave between
    steps (continuous batching).

    `max_rows` rows of `max_len` positions each are allocated up front. max_len defaults to the
    model's context (`sequence_len`); a larger one (up to the rotary table) lets rows run past
    the context the model was trained on. Without a tokenizer rows stop only at max_tokens and
    tools are off (benchmarks on random weights). One thread drives a batch: it is not locked.

    `cuda_graphs` (CUDA only) replays one captured CUDA graph per bucket of rows for each
    decode step instead of launching the forward's kernels one by one; `static_shapes` runs
    that same bucketed fixed-shape step eagerly, on any device (see the module docstring).
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer | None = None,
        *,
        max_rows: int = 8,
        max_len: int | None = None,
        cuda_graphs: bool = False,
        static_shapes: bool = False,
    ) -> None:
        if _not_int(max_rows) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        max_len = model.config.sequence_len if max_len is None else max_len
        if _not_int(max_len) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.get_device()
        self.cache: DecodeCache = model.new_cache(max_rows, max_len)
        self.rows: list[Row] = []
        self._special = _SpecialIds.of(tokenizer)
        # A family may offer a leaner forward for decoding (GPT's, for devices that compute in
        # fp32: engine/models/gpt_inference.py); otherwise its forward runs under autocast.
        self._lean = family_of(model.config).fast_decoder(model, self.cache)
        self._view: Any = None  # the active rows' view of the cache, rebuilt when rows change
        self._settings: SamplingSettings | None = None
        self._next_ids: torch.Tensor | None = None
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device; the model is on {self.device}")
        if (cuda_graphs or static_shapes) and not isinstance(self.cache, KVCache):
            raise ValueError(
                "static-shape decoding (and CUDA graphs) needs a model whose decode state is a "
                "KV cache only; this model also keeps recurrent states"
            )
        self._static = (
            _StaticDecoder(model, self.cache, capture=cuda_graphs)
            if cuda_graphs or static_shapes
            else None
        )

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs."""
        return self._static is not None and self._static.capture

    @property
    def max_rows(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def add(self, prompt: Sequence[int], params: SamplingParams | None = None) -> Row:
        """Prefill `prompt` into a free row and make it join the batch."""
        return self.add_samples(prompt, params, 1)[0]

    @torch.inference_mode()
    def add_samples(
        self, prompt: Sequence[int], params: SamplingParams | None, num_samples: int
    ) -> list[Row]:
        """Prefill `prompt` once and start `num_samples` rows from it, each with its own seed
        (`row_seed(params.seed, i)`)."""
        params = SamplingParams() if params is None else params
        if _not_int(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if num_samples > self.free_rows:
            raise ValueError(
                f"the batch has {self.free_rows} free rows of {self.max_rows}, "
                f"{num_samples} requested"
            )
        prompt = self._checked_tokens(prompt, "prompt")
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        # The last prompt token is the first decode input, so the cache must hold the other
        # len - 1 plus one position per generated token but the last.
        room = self.max_len - (len(prompt) - 1)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt)} tokens does not fit the KV cache of {self.max_len} "
                f"positions"
            )
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        first = len(self.rows)
        self.cache.reset(first)
        if len(prompt) > 1:
            ids = _upload([prompt[:-1]], torch.long, self.device)
            self._forward(ids, self.cache.rows(first, first + 1), logits=False)
        self.cache.replicate(first, first + 1, first + num_samples)
        new_rows = []
        for i in range(num_samples):
            row = Row(
                tokens=list(prompt),
                prompt_len=len(prompt),
                temperature=float(params.temperature),
                top_k=params.top_k,
                max_tokens=max_tokens,
                seed=row_seed(params.seed, i),
                index=i,
                top_logprobs=params.logprobs,
                slot=first + i,
            )
            new_rows.append(row)
        self.rows.extend(new_rows)
        self._rows_changed()
        return new_rows

    def force(self, row: Row, tokens: Sequence[int]) -> None:
        """Make `row` emit `tokens` next (mask 0), as if the model had chosen them: they are fed
        to the model and seen by the tool logic like sampled tokens."""
        if row.done or row not in self.rows:
            raise ValueError("cannot force tokens into a row that is not active in this batch")
        row.forced.extend(self._checked_tokens(tokens, "forced tokens"))

    def cancel(self, row: Row) -> None:
        """Stop `row` now and free its slot (e.g. the client went away)."""
        if row.done:
            return
        if row not in self.rows:
            raise ValueError("cannot cancel a row that is not in this batch")
        row.done, row.finish_reason = True, FinishReason.CANCELLED
        self._remove([row])

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int, int]]:
        """One forward over every active row: (row, token, mask) per row, in slot order.

        Rows that finish with this token (stop token or max_tokens) leave the batch after it.
        """
        rows = self.rows
        if not rows:
            return []
        if self._static is not None:
            logits = self._static_logits()
        else:
            if self._view is None:
                self._view = self.cache.rows(0, len(rows))
            ids = self._next_ids
            if ids is None:
                ids = _upload([row.tokens[-1:] for row in rows], torch.long, self.device)
            logits = self._forward(ids, self._view)
        sampled = self._sample(logits)
        events = []
        finished = []
        forced_any = False
        # The step's one wait for the device: everything below is decided from these tokens.
        chosen = []
        for row, token in zip(rows, sampled.view(-1).tolist(), strict=True):
            mask = 1
            if row.forced:
                token, mask, forced_any = row.forced.popleft(), 0, True
            chosen.append((token, mask))
        if any(row.top_logprobs is not None for row in rows):
            self._add_logprobs(logits, [token for token, _ in chosen])
        for row, (token, mask) in zip(rows, chosen, strict=True):
            self._record(row, token, mask)
            events.append((row, token, mask))
            if row.done:
                finished.append(row)
        # Unless something was forced or rows changed, this step's tokens are the next inputs
        # as they are: no list -> tensor round trip (nor a host -> device copy on a GPU).
        self._next_ids = None if forced_any else sampled
        if finished:
            self._remove(finished)
        return events

    def _add_logprobs(self, logits: torch.Tensor, tokens: list[int]) -> None:
        """Append each asking row's `TokenLogprob` for the token it takes this step."""
        wanted = [i for i, row in enumerate(self.rows) if row.top_logprobs is not None]
        index = _upload(wanted, torch.long, self.device)
        found = token_logprobs(
            logits.index_select(0, index),
            [tokens[i] for i in wanted],
            max(self.rows[i].top_logprobs for i in wanted),
        )
        for i, entry in zip(wanted, found, strict=True):
            row = self.rows[i]
            row.logprobs.append(TokenLogprob(entry.logprob, entry.top[: row.top_logprobs]))

    def _static_logits(self) -> torch.Tensor:
        """(B, vocab) logits of the active rows' next tokens through the static decoder."""
        rows, static = self.rows, self._static
        count = len(rows)
        host = self.cache.host_lengths
        if max(host[:count]) + 1 > self.max_len:
            raise ValueError(f"KV cache overflow: a row already holds max_len {self.max_len}")
        ids = static.ids[:count]
        if self._next_ids is not None:
            ids.copy_(self._next_ids)
        else:
            _upload_into(ids, [row.tokens[-1:] for row in rows])
        logits = static.logits(count)
        for slot in range(count):
            host[slot] += 1
        return logits

    def _forward(self, ids: torch.Tensor, cache: Any, logits: bool = True) -> torch.Tensor | None:
        """The (B, vocab) logits of each row's last new token, or None when not wanted."""
        if self._lean is not None:
            return self._lean(ids, cache, logits=logits)
        with autocast(self.device):
            out = self.model(ids, kv_cache=cache)
        return out[:, -1] if logits else None

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 1) tokens, one per active row."""
        rows = self.rows
        if self._settings is None:
            self._settings = SamplingSettings(
                [row.temperature for row in rows],
                [row.top_k for row in rows],
                logits.size(-1),
                self.device,
            )
        if self._settings.all_greedy or all(row.forced for row in rows):
            return logits.max(dim=-1, keepdim=True).indices
        # Rows whose next token is forced draw nothing, so a row's random stream does not
        # depend on what gets forced into it.
        uniforms = [
            [row.next_uniform() if row.temperature > 0 and not row.forced else 0.0] for row in rows
        ]
        u = _upload(uniforms, self._settings.cdf_dtype, self.device)
        return self._settings.sample(logits, u)

    def _record(self, row: Row, token: int, mask: int) -> None:
        row.tokens.append(token)
        row.masks.append(mask)
        row.num_generated += 1
        special = self._special
        if token in special.stop:
            row.done, row.finish_reason = True, FinishReason.STOP
        elif row.num_generated >= row.max_tokens:
            row.done, row.finish_reason = True, FinishReason.LENGTH
        if row.done or not special.has_tools:
            return
        if token == special.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == special.python_end and row.in_python:
            row.in_python = False
            result = calculator.evaluate_expression(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced.extend(
                    [special.output_start, *self.tokenizer.encode(result), special.output_end]
                )
        elif row.in_python:
            row.python_tokens.append(token)

    def _remove(self, leaving: list[Row]) -> None:
        # Fill each freed slot with the last row, keeping the active rows in slots 0..n-1.
        # Highest slots first, so the row moved down is never one that is leaving too.
        for row in sorted(leaving, key=lambda r: r.slot, reverse=True):
            last = self.rows.pop()
            if last is not row:
                self.cache.move(last.slot, row.slot)
                last.slot = row.slot
                self.rows[row.slot] = last
            row.slot = -1
        self._rows_changed()

    def _rows_changed(self) -> None:
        self._view = None
        self._settings = None
        self._next_ids = None

    def _checked_tokens(self, tokens: Sequence[int], what: str) -> list[int]:
        tokens = list(tokens)
        vocab = self.model.config.vocab_size
        for token in tokens:
            if _not_int(token) or not 0 <= token < vocab:
                raise ValueError(f"{what} hold {token!r}, not a token id in [0, {vocab})")
        return tokens


# ---- the static decode step (CUDA graphs) ----------------------------------------------------


class StaticCacheRows:
    """Rows [0, bucket) of a `KVCache` as an `engine.models.gpt.KVCache` whose every tensor keeps its
    shape and address from step to step, so that a decode step through it can be captured in a
    CUDA graph and replayed.

    Unlike `CacheRows`, nothing is planned from the host: each row's new key goes in with one
    indexed write at its device length, and attention reads all `max_len` positions, masked by
    the device lengths (`k_len`). Rows of the bucket past the active ones (padding) decode
    garbage that nobody reads; their positions are clamped to the last one so that they never
    write out of bounds and always see at least one key (finite values, no NaN left in a slot
    the next row will use).
    """

    def __init__(self, cache: KVCache, bucket: int) -> None:
        self._stored = cache.lengths[:bucket]
        self.last_tokens = cache.last_tokens[:bucket]
        self.max_len = cache.max_len
        self._k_by_pos = [layer[:bucket].transpose(1, 2) for layer in cache.k]
        self._v_by_pos = [layer[:bucket].transpose(1, 2) for layer in cache.v]
        self._row_ids = torch.arange(bucket, device=cache.lengths.device)[:, None]
        self.lengths = self._stored
        self._k_len = self._stored
        self._index = (self._row_ids, self._stored[:, None])

    def begin(self) -> None:
        """Read this step's positions from the device lengths (device ops only)."""
        self.lengths = self._stored.clamp(max=self.max_len - 1)
        self._k_len = self.lengths + 1
        self._index = (self._row_ids, self.lengths[:, None])

    def insert(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if k.size(1) != 1:
            raise ValueError(f"the static decode step takes one token per row, got {k.size(1)}")
        keys, values = self._k_by_pos[layer], self._v_by_pos[layer]
        keys.index_put_(self._index, k)
        values.index_put_(self._index, v)
        return keys, values, self._k_len

    def advance(self, num_tokens: int) -> None:
        self._stored += num_tokens  # in place: the cache's own lengths, at a fixed address


def row_buckets(max_rows: int) -> list[int]:
    """The batch sizes a static decoder runs: powers of two below max_rows, then max_rows."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return [*buckets, max_rows]


class _StaticDecoder:
    """One fixed-shape decode forward per bucket of rows, eager or captured as a CUDA graph.

    `ids` (max_rows, 1) is the static input: the batch writes the active rows' next tokens into
    its first rows, then `logits(count)` runs (or replays) the forward of the smallest bucket
    holding `count` rows and returns the active rows' logits. A graph's output is overwritten
    by the next replay, so it must be consumed (sampled) before the next step -- which the
    batch does. Graphs are captured lazily, on a bucket's first step, and share one memory pool.
    """

    def __init__(self, model: LanguageModel, cache: KVCache, *, capture: bool) -> None:
        self.model = model
        self.cache = cache
        self.capture = capture
        self.device = cache.k.device
        self.buckets = row_buckets(cache.batch_size)
        self.ids = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=self.device)
        self._views: dict[int, StaticCacheRows] = {}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def bucket(self, count: int) -> int:
        return next(size for size in self.buckets if size >= count)

    def logits(self, count: int) -> torch.Tensor:
        """(count, vocab) fp32 logits of rows [0, count), advancing their device lengths."""
        size = self.bucket(count)
        if not self.capture:
            return self._forward(size)[:count]
        graph = self._graphs.get(size)
        if graph is None:
            graph = self._graphs[size] = self._record(size)
        graph[0].replay()
        return graph[1][:count]

    def _forward(self, size: int) -> torch.Tensor:
        view = self._views.get(size)
        if view is None:
            view = self._views[size] = StaticCacheRows(self.cache, size)
        view.begin()
        dtype = compute_dtype(self.device)
        # Autocast's cache of cast weights is freed when the context exits, which would leave a
        # graph reading freed memory: graphs are recorded (and replayed) with it off.
        context = (
            contextlib.nullcontext()
            if dtype == torch.float32
            else torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)
        )
        with context:
            out = self.model(self.ids[:size], kv_cache=view)
        return out[:, -1]

    def _record(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm the bucket's forward up on a side stream, then capture it.

        The warm-up really runs: it writes keys at each row's next position (which the real
        step overwrites) and advances the device lengths and overwrites the rows' last tokens
        (GPT's smear gate reads them), which are put back afterwards.
        """
        lengths, last_tokens = self.cache.lengths, self.cache.last_tokens
        saved, saved_tokens = lengths.clone(), last_tokens.clone()
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(size)
                    lengths.copy_(saved)
                    last_tokens.copy_(saved_tokens)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: an engine worker's other threads may touch CUDA meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(size)
            lengths.copy_(saved)
            last_tokens.copy_(saved_tokens)
        return graph, out


# ---- the nanochat-style interface ----------------------------------------------------------


class Engine:
    """Generation for one prompt at a time, `num_samples` rows sharing its prefill.

    With `cuda_graphs` (or `static_shapes`, see `Batch`) the engine keeps one batch per sample
    count, sized to the model's context, so that its captured graphs serve every later call:
    one generation at a time (a new call cancels what is left of the previous one).
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer | None,
        *,
        cuda_graphs: bool = False,
        static_shapes: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs
        self.static_shapes = static_shapes
        self._batches: dict[int, Batch] = {}

    def generate(
        self,
        tokens: Sequence[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Per step, (token of each sample, mask of each sample): mask 1 = sampled, 0 = forced.

        A sample's column holds its stop token (<|assistant_end|> or <|bos|>) on the step it
        stops, then `FINISHED` (with mask 0) until the last sample is done. max_tokens None or
        too large is clamped to what fits in the model's context (`sequence_len`).
        """
        context = self.model.config.sequence_len
        if len(tokens) > context:
            raise ValueError(
                f"prompt of {len(tokens)} tokens exceeds the model's context of {context} tokens"
            )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed
        )
        batch = self._batch_for(len(tokens), num_samples, max_tokens)
        batch.add_samples(tokens, params, num_samples)
        return _columns(batch, num_samples)

    def _batch_for(self, prompt_len: int, num_samples: int, max_tokens: int | None) -> Batch:
        context = self.model.config.sequence_len
        if self.cuda_graphs or self.static_shapes:
            batch = self._batches.get(num_samples)
            if batch is None:
                batch = Batch(
                    self.model, self.tokenizer, max_rows=num_samples, max_len=context,
                    cuda_graphs=self.cuda_graphs, static_shapes=self.static_shapes,
                )  # fmt: skip
                self._batches[num_samples] = batch
            for row in list(batch.rows):
                batch.cancel(row)
            return batch
        # Size the cache to this request: prompt minus its last token, plus one per new token.
        cached = max(prompt_len - 1, 0)
        room = context - cached
        needed = cached + (room if max_tokens is None else min(max_tokens, room))
        return Batch(self.model, self.tokenizer, max_rows=num_samples, max_len=max(needed, 1))

    def generate_batch(
        self,
        tokens: Sequence[int],
        num_samples: int = 1,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Whole sequences: (prompt + generated tokens, masks) per sample.

        Stop tokens are left out; the prompt's positions have mask 0.
        """
        stops = _SpecialIds.of(self.tokenizer).stop
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        for column, mask_column in self.generate(
            tokens, num_samples, max_tokens, temperature, top_k, seed
        ):
            for i, (token, mask) in enumerate(zip(column, mask_column, strict=True)):
                if token != FINISHED and token not in stops:
                    sequences[i].append(token)
                    masks[i].append(mask)
        return sequences, masks


def _columns(batch: Batch, num_samples: int) -> Iterator[tuple[list[int], list[int]]]:
    while batch.rows:
        column = [FINISHED] * num_samples
        masks = [0] * num_samples
        for row, token, mask in batch.step():
            column[row.index] = token
            masks[row.index] = mask
        yield column, masks


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


# ---- host -> device ------------------------------------------------------------------------


def _upload(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (nested lists) as a tensor on `device`, without waiting for the device.

    `torch.tensor(values, device="cuda")` copies from pageable memory and then synchronizes the
    stream, i.e. waits for every kernel queued before it. From pinned memory the copy is
    asynchronous, and the pinned block is not reused before the copy has run (the caching
    host allocator records it on the stream).
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _upload_into(target: torch.Tensor, values: list) -> None:
    """Copy `values` (nested lists shaped like `target`) into `target`, as `_upload` does."""
    if target.device.type != "cuda":
        target.copy_(torch.tensor(values, dtype=target.dtype))
        return
    target.copy_(torch.tensor(values, dtype=target.dtype, pin_memory=True), non_blocking=True)


# ---- choosing a device ---------------------------------------------------------------------


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """The device `spec` names ("auto", "cpu", "mps", "cuda" or "cuda:N"), checked to exist.

    cuda:N counts within the devices this process can see: with CUDA_VISIBLE_DEVICES=4,5,
    cuda:0 is physical GPU 4 and cuda:1 GPU 5. "cuda" is cuda:0. Errors are ValueErrors that
    name `flag`, the option the user gave, and what is visible.
    """
    if spec == "auto":
        device = autodetect_device()
        return torch.device("cuda", 0) if device.type == "cuda" else device
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(
            f"{flag} {spec!r}: not a device ({exc}); use auto, cpu, cuda:N or mps"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {spec}: Apple MPS is not available on this machine")
        return device
    if device.type != "cuda":
        raise ValueError(f"{flag} {spec}: unsupported device type; use auto, cpu, cuda:N or mps")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible})"
    if not torch.cuda.is_available():
        raise ValueError(
            f"{flag} {spec}: CUDA is not available to this process{where}: torch "
            f"{torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU"
        )
    index = 0 if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"{flag} {spec}: this process sees {count} CUDA device(s){where}, cuda:0 to "
            f"cuda:{count - 1}; N counts within the visible devices"
        )
    return torch.device("cuda", index)
