"""FLOPs of a generate call reported while it runs, so a forecast killed in the middle of a long call (kill -9, a
lost machine) has booked what it computed: `generate` reads its token constraint after every token, and
`ReportingConstraint` passes that on and hands `FlopsSoFar` to the forecast's on_flops at the first read (the prefill
is done) and then at least every `DECODE_STEPS_PER_REPORT` decode forwards. The call's own GenerationFlops still
follows when it ends; a booker books each report's increase (`forecasting.budget.booker`)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from qwen_mini.flops import GenerationFlops
from qwen_mini.generate import DecodeStats

# Decode forwards between two reports of a call's FLOPs so far: each report is a ledger write (the count itself is
# arithmetic, qwen_mini.flops.GenerationCounter), next to this many forwards of the whole batch.
DECODE_STEPS_PER_REPORT = 32


@dataclass(frozen=True)
class FlopsSoFar(GenerationFlops):
    """What a generate call has computed so far (its prefill and the decode forwards run up to now); the call goes
    on. Counted as generation_flops counts it, so never more than the call's final GenerationFlops (but see the
    compiled path, where the booker keeps the larger of the two)."""


class ReportingConstraint:
    """A token constraint (NumberGrammar, StepCounter) for `generate`, reporting the call's FLOPs so far.

    `so_far(forwards)`: the call's GenerationFlops after its prefill and `forwards` decode forwards; `decode`: the
    DecodeStats `generate` fills in (its `forwards` count is the one read); `report`: on_flops."""

    def __init__(self, constraint, decode: DecodeStats, so_far: Callable[[int], GenerationFlops],
                 report: Callable[[GenerationFlops], None], every: int = DECODE_STEPS_PER_REPORT):
        self.constraint, self.decode, self.so_far, self.report, self.every = constraint, decode, so_far, report, every
        self.reported: int | None = None  # decode forwards at the last report

    def allowed(self):
        return self.constraint.allowed()

    def read(self, tokens) -> None:
        self.constraint.read(tokens)
        forwards = self.decode.forwards
        if self.reported is None or forwards - self.reported >= self.every:
            self.reported = forwards
            self.report(FlopsSoFar(**asdict(self.so_far(forwards))))
