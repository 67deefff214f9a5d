"""A token constraint that only lets a model write well-formed LLMTIME steps.

Per row it tracks where it is in "d.dd,d.dd;" and allows only the characters that keep the text well formed:
digits of the integer part (at most `int_digits`, no leading zeros), the point, exactly `decimals` fractional
digits, "," between variables, ";" after the last one. After `horizon` steps only the stop token is allowed, so
every row ends with exactly `horizon` parseable steps.
"""
from __future__ import annotations

import torch

from data.llmtime import STEP_SEP, VAR_SEP


def single_token_ids(tokenizer, chars: str) -> dict[str, int]:
    """Id of each character; each must be exactly one token on its own (true for Qwen's tokenizer and ours)."""
    ids = {}
    for ch in chars:
        encoded = tokenizer.encode(ch)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer splits {ch!r} into {len(encoded)} tokens ({encoded}); the number grammar "
                             f"needs one token per character")
        ids[ch] = encoded[0]
    return ids


class NumberGrammar:
    """allowed_tokens hook for `qwen_mini.generate` (stateful: one instance per generate call)."""

    def __init__(self, tokenizer, vocab_size: int, batch: int, n_vars: int, horizon: int, decimals: int = 2,
                 int_digits: int = 3, allow_negative: bool = False, stop_id: int | None = None):
        self.n_vars, self.horizon, self.decimals, self.int_digits = n_vars, horizon, decimals, int_digits
        self.ids = single_token_ids(tokenizer, "0123456789." + VAR_SEP + STEP_SEP + ("-" if allow_negative else ""))
        self.stop_id = tokenizer.eos_id if stop_id is None else stop_id
        if self.stop_id is None:
            raise ValueError("the tokenizer has no eos token to end a forecast with; pass stop_id")
        self.char_of = {i: c for c, i in self.ids.items()}
        self.allow_negative = allow_negative
        self.vocab_size, self.batch = vocab_size, batch
        self.state = [dict(var=0, steps=0, number="") for _ in range(batch)]
        masks = {}
        for name, chars in {"digits": "0123456789", "point": ".", "var": VAR_SEP,
                            "step": STEP_SEP, "minus": "-" if allow_negative else ""}.items():
            mask = torch.zeros(vocab_size, dtype=torch.bool)
            mask[[self.ids[c] for c in chars]] = True
            masks[name] = mask
        stop = torch.zeros(vocab_size, dtype=torch.bool)
        stop[self.stop_id] = True
        masks["stop"] = stop
        self.masks = masks

    @property
    def candidate_ids(self) -> list[int]:
        """Every token the grammar can ever allow (for generate's candidate_ids)."""
        return sorted({*self.ids.values(), self.stop_id})

    def max_new_tokens(self) -> int:
        per_number = int(self.allow_negative) + self.int_digits + (1 + self.decimals if self.decimals else 0)
        return self.horizon * self.n_vars * (per_number + 1) + 1

    def _advance(self, row: int, token: int) -> None:
        s = self.state[row]
        ch = self.char_of.get(token)
        if ch == VAR_SEP:
            s["var"] += 1
            s["number"] = ""
        elif ch == STEP_SEP:
            s["var"], s["number"] = 0, ""
            s["steps"] += 1
        elif ch is not None:
            s["number"] += ch

    def _allowed(self, row: int) -> torch.Tensor:
        s, m = self.state[row], self.masks
        if s["steps"] >= self.horizon:
            return m["stop"]
        number = s["number"]
        digits = number.lstrip("-")
        end = m["var"] if s["var"] < self.n_vars - 1 else m["step"]
        if "." in digits:
            return m["digits"] if len(digits.split(".")[1]) < self.decimals else end
        if digits == "":
            first = m["digits"]
            return first | m["minus"] if number == "" else first
        complete = end if self.decimals == 0 else m["point"]
        if digits == "0" or len(digits) >= self.int_digits:
            return complete  # no leading zeros; at most int_digits before the point
        return m["digits"] | complete

    def __call__(self, step: int, generated: torch.Tensor) -> torch.Tensor:
        if step > 0:
            for row, token in enumerate(generated[:, -1].tolist()):
                self._advance(row, token)
        return torch.stack([self._allowed(row) for row in range(self.batch)])
