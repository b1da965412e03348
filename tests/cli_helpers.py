"""Helpers for tests that drive the ``psadv`` command line in-process."""

from click.testing import CliRunner

from psadv.cli import cli

# A 2-version run in seconds (conftest's tiny_run), and an evaluation of it in a second.
TINY_TRAIN = ["--steps", "2", "--batch-size", "20", "--attack-steps", "1", "--eval-examples", "10", "--eval-steps",
              "1", "--threads", "1", "--no-progress"]
TINY_EVAL = ["--examples", "2", "--attack", "pgd", "--steps", "1", "--restarts", "1", "--threads", "1",
             "--no-progress"]


def without(flags, option):
    """``flags`` less ``option`` and its value (psadv refuses ``--attack-steps`` with another attack than PGD)."""
    i = flags.index(option)
    return [*flags[:i], *flags[i + 2:]]


def invoke(*args):
    """Run ``psadv ARGS`` with click's test runner (arguments may be paths or numbers)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, code, *fragments):
    """The command failed with exit ``code`` and one stderr line ``psadv: error: …`` holding ``fragments``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psadv: error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
