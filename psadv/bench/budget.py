"""Time to target as a budget search: the smallest ``--time-budget`` at which a recipe reaches it.

A run's schedules stretch to its budget, so a recipe's time to target is not where one long run
happens to cross the line but the shortest budget whose runs end at the target: for every seed,
the final model (evaluated once, after the run) is at or above it. :class:`BudgetSearch` decides
which budget to try next from the results so far — pure policy, no clocks or processes; the
benchmark (``scripts/budget_search.py``) runs what it asks for.

The search brackets the answer by doubling a failing budget or halving a passing one, then
bisects (geometrically) until the bracket is narrower than ``tolerance`` (relative). Accuracy is
not exactly monotone in the budget (seeds differ), so the answer is the smallest *tried* budget that
passed with every failing budget below it; a pass below a failure is reported, not hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class BudgetSearch:
    """Which budget to try next, given which budgets passed (every seed at the target) or failed."""

    start: float
    tolerance: float = 0.15  # stop when passing / failing budget <= 1 + tolerance
    min_budget: float = 1.0
    max_budget: float = 3600.0
    results: dict[float, bool] = field(default_factory=dict)

    def __post_init__(self):
        if not (self.min_budget <= self.start <= self.max_budget):
            raise ValueError(f"start {self.start} outside [{self.min_budget}, {self.max_budget}]")
        if not self.tolerance > 0:
            raise ValueError("tolerance must be > 0")

    def record(self, budget: float, passed: bool) -> None:
        self.results[float(budget)] = bool(passed)

    @property
    def passing(self) -> float | None:
        """The smallest budget that passed."""
        return min((b for b, ok in self.results.items() if ok), default=None)

    @property
    def failing(self) -> float | None:
        """The largest budget that failed below the smallest pass (any failure if nothing passed)."""
        best = self.passing
        below = [b for b, ok in self.results.items() if not ok and (best is None or b < best)]
        return max(below, default=None)

    @property
    def non_monotone(self) -> list[float]:
        """Failed budgets above the smallest pass: evidence that seeds, not the budget, decided."""
        best = self.passing
        return sorted(b for b, ok in self.results.items() if not ok and best is not None and b > best)

    def next_budget(self) -> float | None:
        """The next budget to run, or None when the search is over (answer or no answer in range)."""
        if not self.results:
            return self.start
        passing, failing = self.passing, self.failing
        if passing is None:  # nothing passed yet: double the largest failure
            nxt = min(2 * failing, self.max_budget)
            return None if nxt in self.results else nxt
        if failing is None:  # everything passed: halve the smallest pass
            nxt = max(passing / 2, self.min_budget)
            return None if nxt in self.results else nxt
        if passing / failing <= 1 + self.tolerance:
            return None
        nxt = round(math.sqrt(passing * failing), 1)
        return None if nxt in self.results or not failing < nxt < passing else nxt

    def answer(self) -> dict:
        """The result: time to target (the smallest passing budget), its bracket, and the budgets tried."""
        return {"time_to_target": self.passing, "bracket": [self.failing, self.passing],
                "tried": {str(b): ok for b, ok in sorted(self.results.items())},
                "non_monotone": self.non_monotone, "done": self.next_budget() is None}


def ratio(baseline: dict, recipe: dict) -> float | None:
    """How many times shorter the recipe's time to target is than the baseline's (None if either is missing)."""
    a, b = baseline.get("time_to_target"), recipe.get("time_to_target")
    return None if not a or not b else a / b


def bracket_text(failing: float | None, passing: float | None) -> str:
    """Where the time to target lies, as an interval of seconds: ``(60, 120]`` when a budget failed
    and a longer one passed, ``> 60`` when none passed, ``≤ 120`` when none failed."""
    if failing is not None and passing is not None:
        return f"({failing:g}, {passing:g}]"
    if failing is not None:
        return f"> {failing:g}"
    return "–" if passing is None else f"≤ {passing:g}"
