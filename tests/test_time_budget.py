"""A time budget says what it covers, and its progress bar shows the share done and the time left."""

import io
from types import SimpleNamespace

from cli_helpers import invoke
from psadv.config import make_config
from psadv.console import ProgressBar, budget_line


class FakeTrainer:
    """What the progress bar reads of a trainer: its config, version, progress and last evaluation."""

    def __init__(self, time_budget: float, total_versions: int = 0):
        self.cfg = SimpleNamespace(time_budget=time_budget)
        self.total_versions, self.version, self.fraction = total_versions, 0, 0.0
        self.state = SimpleNamespace(last_eval={"robust_acc": 0.5, "version": 3})

    def progress(self) -> float:
        return self.fraction


def test_budget_line_says_what_the_time_budget_leaves_out():
    assert budget_line(make_config({"time_budget": 45})) == (
        "time budget 45s of training, periodic evaluations included (start-up and the final evaluation come on top)")
    assert budget_line(make_config({"steps": 10})) == ""


def test_time_budget_bar_shows_the_share_done_and_the_time_left():
    trainer, out = FakeTrainer(time_budget=45), io.StringIO()
    bar = ProgressBar(trainer, "train", True, file=out)
    trainer.version, trainer.fraction = 120, 0.4
    bar.advanced()
    bar.show(rate=950.0)
    text = str(bar.bar)
    assert text.startswith("train:  40%|") and " left" in text and "<" in text
    assert "v120 950 ex/s robust 50.0% @v3" in text
    bar.close()
    steps = ProgressBar(FakeTrainer(time_budget=0, total_versions=10), "train", True, file=io.StringIO())
    steps.advanced()
    assert "1/10" in str(steps.bar)  # a version budget keeps counting versions
    steps.close()


def test_train_start_up_line_names_the_budget(tmp_path, mnist_dir):
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "r", "--time-budget", 0.5,
                    "--steps", 1, "--batch-size", 20, "--attack-steps", 1, "--eval-examples", 4, "--eval-steps", 1,
                    "--threads", 1, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert "; time budget 0.5s of training, periodic evaluations included (start-up and the final evaluation " \
           "come on top); 1 thread (--threads)" in result.stderr
