"""A token constraint that lets a model write nothing but well-formed LLMTIME steps, `horizon` of them.

The number grammar, per variable: an optional "-" (only when negatives are allowed; LV populations are not
negative, so off by default), 1 to `int_digits` integer digits without leading zeros, then "." and exactly
`decimals` digits (no point when decimals is 0). Numbers are joined by "," within a step and each step ends with
";". After `horizon` steps only the stop token is allowed, so every row ends with exactly `horizon` steps that
`data.llmtime.decode` parses, and `qwen_mini.generate` stops once every row has written its stop token.

The state of every row is a handful of integer tensors on the model's device, updated from the last generated
token each step, so the constraint costs a few vector operations per step whatever the batch size (no Python loop
over rows, no host-device copy).
"""
from __future__ import annotations

import torch

from data.llmtime import STEP_SEP, VAR_SEP

DIGITS = "0123456789"
POINT = "."
MINUS = "-"


def single_token_ids(tokenizer, chars: str) -> dict[str, int]:
    """The id of each character of `chars`, looked up with `tokenizer.token_to_id`. The grammar steers the model
    one character at a time, so each character must be exactly one token: its id must exist and encoding the
    character alone must give just that id (true for Qwen2.5's tokenizer and the tiny preset's)."""
    ids = {}
    for ch in chars:
        token_id = tokenizer.token_to_id(ch)
        encoded = tokenizer.encode(ch)
        if token_id is None or encoded != [token_id]:
            raise ValueError(f"the number grammar needs {ch!r} to be exactly one token, but the tokenizer has "
                             f"token_to_id({ch!r}) = {token_id} and encodes {ch!r} as {encoded}")
        ids[ch] = token_id
    return ids


def max_forecast_tokens(horizon: int, n_vars: int, decimals: int = 2, int_digits: int = 3,
                        allow_negative: bool = False) -> int:
    """Characters of the longest forecast the grammar admits (every number at full width, each followed by its
    separator), plus the stop token: the token budget of one forecast."""
    number = int(allow_negative) + int_digits + (1 + decimals if decimals else 0)
    return horizon * n_vars * (number + 1) + 1


def grammar_chars(allow_negative: bool = False) -> str:
    """The characters the number grammar writes (one token each); with the stop token, every token it allows."""
    return DIGITS + POINT + VAR_SEP + STEP_SEP + (MINUS if allow_negative else "")


class LockstepCalls:
    """`constraint(step, generated)`: the lockstep form of a constraint that `read`s one token per row at a time and
    says what is `allowed` next (HF's logits processors call it so), every row one token further each call."""
    fresh = "a new one"  # what the error tells the caller to use instead of a constraint already used

    def __call__(self, step: int, generated: torch.Tensor) -> torch.Tensor:
        # The caller passes the `step` tokens written so far; this constraint has read all but the newest one.
        if self.tokens_read != max(step - 1, 0):
            raise RuntimeError(f"{type(self).__name__} was asked about step {step} after reading {self.tokens_read} "
                               f"tokens: use {self.fresh} for every generate call")
        if step > 0:
            self.read(generated[:, -1])
        return self.allowed()


class NumberGrammar(LockstepCalls):
    """The `allowed_tokens` constraint of `qwen_mini.generate` for `batch` rows forecasting `horizon` steps of
    `n_vars` numbers each (`read` each row's new token, ask what is `allowed` next; rows may advance unevenly, as in
    jump-forward decoding). Stateful: use one instance per generate call. Calling it as `grammar(step, generated)`
    is the lockstep form (HF's logits processors)."""
    fresh = "a new grammar"

    def __init__(self, tokenizer, vocab_size: int, batch: int, n_vars: int, horizon: int, decimals: int = 2,
                 int_digits: int = 3, allow_negative: bool = False, stop_id: int | None = None,
                 device: torch.device | str | None = None):
        if batch < 1 or n_vars < 1 or horizon < 1 or int_digits < 1 or decimals < 0:
            raise ValueError(f"NumberGrammar needs batch, n_vars, horizon, int_digits >= 1 and decimals >= 0, got "
                             f"batch={batch}, n_vars={n_vars}, horizon={horizon}, int_digits={int_digits}, "
                             f"decimals={decimals}")
        self.batch, self.n_vars, self.horizon = batch, n_vars, horizon
        self.decimals, self.int_digits, self.allow_negative = decimals, int_digits, allow_negative
        self.vocab_size = vocab_size
        self.stop_id = tokenizer.eos_id if stop_id is None else stop_id
        if self.stop_id is None:
            raise ValueError("the tokenizer has no eos token to end a forecast with; pass stop_id")
        chars = grammar_chars(allow_negative)
        self.ids = single_token_ids(tokenizer, chars)
        if self.stop_id in self.ids.values():
            raise ValueError(f"the stop token {self.stop_id} is also the token of a grammar character")
        too_big = [i for i in (*self.ids.values(), self.stop_id) if not 0 <= i < vocab_size]
        if too_big:
            raise ValueError(f"token id(s) {too_big} are outside the model's vocabulary of {vocab_size}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Columns of the small per-step mask: the ten digits, point, variable separator, step separator, minus (if
        # allowed), stop; scattered into a full-vocabulary mask each step.
        self.column_ids = torch.tensor([self.ids[c] for c in chars] + [self.stop_id], device=self.device)
        self.is_digit = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self.is_digit[[self.ids[c] for c in DIGITS]] = True
        zeros = lambda dtype: torch.zeros(batch, dtype=dtype, device=self.device)
        self.steps = zeros(torch.long)  # completed steps
        self.var = zeros(torch.long)  # which variable of the step is being written
        self.int_len = zeros(torch.long)  # integer digits of the current number so far
        self.frac_len = zeros(torch.long)  # digits after its point so far
        self.has_point = zeros(torch.bool)
        self.leading_zero = zeros(torch.bool)  # its integer part is "0": only the point (or an end) may follow
        self.negative = zeros(torch.bool)
        self.tokens_read = 0

    @property
    def candidate_ids(self) -> list[int]:
        """Every token the grammar can ever allow (for generate's candidate_ids: the LM head scores only these)."""
        return sorted({*self.ids.values(), self.stop_id})

    def max_new_tokens(self) -> int:
        return max_forecast_tokens(self.horizon, self.n_vars, self.decimals, self.int_digits, self.allow_negative)

    def read(self, tokens: torch.Tensor) -> None:
        """Advance every row's state by its newly generated token (B,). Tokens outside the grammar (e.g. the stop
        token, padding after it, or NO_TOKEN (-1) for a row that wrote nothing) leave the state unchanged."""
        tokens = tokens.to(self.device)
        digit = self.is_digit[tokens.clamp(0, self.vocab_size - 1)] & (tokens >= 0)
        point, var_sep, step_sep = (tokens == self.ids[c] for c in (POINT, VAR_SEP, STEP_SEP))
        minus = tokens == self.ids[MINUS] if self.allow_negative else torch.zeros_like(point)
        integer_digit = digit & ~self.has_point
        self.leading_zero |= integer_digit & (self.int_len == 0) & (tokens == self.ids["0"])
        self.int_len += integer_digit.long()
        self.frac_len += (digit & self.has_point).long()
        self.has_point |= point
        self.negative |= minus
        ends_number = var_sep | step_sep
        for state in (self.int_len, self.frac_len):
            state.masked_fill_(ends_number, 0)
        for state in (self.has_point, self.leading_zero, self.negative):
            state.masked_fill_(ends_number, False)
        self.var += var_sep.long()
        self.var.masked_fill_(step_sep, 0)
        self.steps += step_sep.long()
        self.tokens_read += 1

    def allowed(self) -> torch.Tensor:
        """(B, vocab_size) bool: the tokens each row may write next."""
        done = self.steps >= self.horizon
        started = self.int_len > 0
        digit = torch.where(self.has_point, self.frac_len < self.decimals,
                            ~started | (~self.leading_zero & (self.int_len < self.int_digits)))
        point = torch.full_like(done, self.decimals > 0) & started & ~self.has_point
        number_complete = started & (self.has_point & (self.frac_len == self.decimals) if self.decimals
                                     else torch.ones_like(done))
        last_var = self.var == self.n_vars - 1
        var_sep, step_sep = number_complete & ~last_var, number_complete & last_var
        minus = torch.full_like(done, self.allow_negative) & ~started & ~self.negative & ~self.has_point
        columns = [*[digit] * len(DIGITS), point, var_sep, step_sep] + ([minus] if self.allow_negative else [])
        columns = torch.stack(columns, dim=1) & ~done[:, None]  # a finished row may only stop
        columns = torch.cat([columns, done[:, None]], dim=1)
        mask = torch.zeros(self.batch, self.vocab_size, dtype=torch.bool, device=self.device)
        mask[:, self.column_ids] = columns
        return mask


class StepCounter(LockstepCalls):
    """The `allowed_tokens` constraint for unconstrained forecasts: any token may follow, but a row that has written
    `horizon` step separators may only stop, so no row generates past its horizon while others finish. The model can
    still write malformed text; decoding counts it. A token that merges the separator with other characters (";\\n"
    in Qwen's vocabulary) counts as many separators as it holds. Same protocol as NumberGrammar."""

    def __init__(self, tokenizer, vocab_size: int, batch: int, horizon: int, stop_id: int | None = None,
                 device: torch.device | str | None = None):
        self.batch, self.horizon, self.vocab_size = batch, horizon, vocab_size
        self.stop_id = tokenizer.eos_id if stop_id is None else stop_id
        if self.stop_id is None:
            raise ValueError("the tokenizer has no eos token to end a forecast with; pass stop_id")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        separators = [0] * vocab_size
        for token_id in range(min(vocab_size, tokenizer.vocab_size)):
            # Byte-level BPE spells printable ASCII as itself, so the token string shows the separator.
            token = tokenizer.id_to_token(token_id) or ""
            separators[token_id] = token.count(STEP_SEP)
        self.separators = torch.tensor(separators, device=self.device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.tokens_read = 0

    def read(self, tokens: torch.Tensor) -> None:
        """Count each row's step separators in its new token (NO_TOKEN, -1: the row wrote nothing)."""
        tokens = tokens.to(self.device)
        self.steps += self.separators[tokens.clamp(0, self.vocab_size - 1)] * (tokens >= 0)
        self.tokens_read += 1

    def allowed(self) -> torch.Tensor:
        done = self.steps >= self.horizon
        mask = (~done)[:, None].expand(self.batch, self.vocab_size).clone()
        mask[:, self.stop_id] = True
        return mask
