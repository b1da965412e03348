"""Console output of a run: the progress bar both trainers show, and the lines ``psadv train`` prints
at start-up (the adversary, the time budget) and at the end (the summary)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm import tqdm

from .config import Config

if TYPE_CHECKING:
    from .training import Trainer


class ProgressBar:
    """The progress bar of both loops: versions, with examples/s and the last robust accuracy.

    Under a time budget the bar runs over the run's progress
    (:meth:`psadv.training.Trainer.progress`: the larger of the time and version fractions), so it
    shows the share done and the time left; the version count moves into its text."""

    SCALE = 1000  # steps of the bar under a time budget

    def __init__(self, trainer: Trainer, desc: str, show: bool, file=None):
        self.trainer = trainer
        self.timed = bool(trainer.cfg.time_budget)
        self.text = ""
        if self.timed:
            self.bar = tqdm(total=self.SCALE, initial=self._position(), desc=desc, disable=not show,
                            dynamic_ncols=True, file=file,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} left{postfix}")
            self._postfix()
        else:
            self.bar = tqdm(total=trainer.total_versions or None, initial=trainer.version, unit="v", desc=desc,
                            disable=not show, dynamic_ncols=True, file=file)

    def _position(self) -> int:
        return min(self.SCALE, int(self.trainer.progress() * self.SCALE))

    def _postfix(self) -> None:
        version = f"v{self.trainer.version}"
        self.bar.set_postfix_str(f"{version} {self.text}" if self.text else version, refresh=False)

    def advanced(self) -> None:
        if self.timed:
            self._postfix()
            self.bar.update(self._position() - self.bar.n)
        else:
            self.bar.update(1)

    def show(self, rate: float | None = None) -> None:
        """Refresh the text: ``rate`` examples/s (after a train row), the last robust accuracy."""
        last = self.trainer.state.last_eval
        parts = [f"{rate:,.0f} ex/s"] if rate else []
        if last:
            parts.append(f"robust {last['robust_acc']:.1%} @v{last['version']}")
        self.text = " ".join(parts)
        if self.timed:
            self._postfix()
            self.bar.refresh()
        else:
            self.bar.set_postfix_str(self.text)

    def close(self) -> None:
        self.bar.close()


def adversary_line(cfg: Config) -> str:
    """The training adversary in words, for the start-up line: what the flags, the config file,
    the dataset's recipe and the defaults came to."""
    if cfg.attack == "none" or cfg.eps == 0:
        return "adversary: none (clean training)"
    name = f"PGD-{cfg.attack_steps}" if cfg.attack == "pgd" else cfg.attack.upper()
    if cfg.attack == "pgd" and cfg.attack_steps_schedule:
        name = f"PGD (steps {cfg.attack_steps_schedule})"
    text = f"adversary: {name} {cfg.norm} eps={cfg.eps:g}"
    text += f" step={cfg.attack_step_ratio:g}ε" if cfg.attack_step_ratio else ""  # else the attack's published step
    if cfg.attack_restarts > 1:
        text += f" x{cfg.attack_restarts} restarts"
    text += f", GradAlign λ={cfg.grad_align:g}" if cfg.grad_align else ""
    text += ", reused perturbations" if cfg.reuse_perturbations else ""
    text += f", {cfg.clean_share:.0%} of each batch clean" if cfg.clean_share else ""
    return text + (", bfloat16 arithmetic" if cfg.precision == "bf16" else "")


def budget_line(cfg: Config) -> str:
    """What a time budget covers, for the start-up line: the training loop's wall-clock time
    (periodic evaluations and checkpoints included), not start-up nor the final evaluation."""
    if not cfg.time_budget:
        return ""
    return (f"time budget {cfg.time_budget:g}s of training, periodic evaluations included (start-up and the "
            "final evaluation come on top)")


def summary_line(summary: dict) -> str:
    text = f"stopped ({summary['stop_reason']}) at version {summary['version']} after {summary['elapsed']:.0f}s"
    last = summary.get("last_eval")
    final = summary.get("final_evaluation", "")
    if final.startswith("interrupted"):
        text += f"; final evaluation {final}"
    if last:
        text += (f"; clean {last['clean_acc']:.2%}, robust {last['robust_acc']:.2%} "
                 f"({last['attack']}, {last['examples']} test examples"
                 + (f", version {last['version']}" if last["version"] != summary["version"] else "") + ")")
    else:
        text += "; not evaluated"
    if summary.get("time_to_target") is not None:
        text += f"; reached target {summary['target_robust_acc']:.0%} after {summary['time_to_target']:.0f}s"
    return text
