"""Which variant answers a request, and why.

For now the policy honours an explicit precision and answers ``AUTO`` with fp32,
the most accurate variant. Cost-aware choices
(accuracy floors, load, budgets) extend :meth:`Policy.choose`.
"""

from __future__ import annotations

from dataclasses import dataclass

from costserve.server.domain import Precision, PredictionRequest


@dataclass(frozen=True)
class Decision:
    """The variant chosen for a request and the reason, a bounded label value."""

    precision: Precision
    reason: str


class Policy:
    """Chooses fp32 or int8 per request."""

    def choose(self, request: PredictionRequest) -> Decision:
        """An explicit precision is honoured; AUTO takes fp32, the most accurate variant."""
        if request.precision is Precision.AUTO:
            return Decision(Precision.FP32, "auto_default")
        return Decision(request.precision, "requested")
