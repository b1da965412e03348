"""The command line: happy paths and every kind of bad input (one line, exit code, nothing written)."""

import json
import shutil

import pytest
import torch

from psadv.devices import native_bf16
from cli_helpers import assert_one_line_error, invoke

FAST = ["--steps", "6", "--batch-size", "50", "--attack-steps", "1", "--eval-examples", "50", "--eval-steps", "1",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_dir):
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", run_dir, *FAST)
    assert result.exit_code == 0, result.output + result.stderr
    assert "stopped (version budget) at version 6" in result.output
    # --precision auto: bfloat16 arithmetic exactly where this CPU has bfloat16 instructions
    arithmetic = ", bfloat16 arithmetic" if native_bf16(torch.device("cpu")) else ""
    assert f"run directory {run_dir}; adversary: PGD-1 linf eps=0.3{arithmetic}; 1 thread (--threads)\n" in result.stderr
    return run_dir


def test_train_writes_a_run(trained_run):
    assert (trained_run / "summary.json").exists()
    assert json.loads((trained_run / "summary.json").read_text())["version"] == 6


def test_inspect_json_and_text(trained_run):
    result = invoke("inspect", trained_run, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.output)
    assert info["model_name"] == "mnist-small" and info["version"] == 6
    text = invoke("inspect", trained_run / "checkpoints" / "ckpt-00000006.h5")
    assert text.exit_code == 0 and "mnist-small" in text.output


def test_eval_json(trained_run, mnist_dir):
    result = invoke("eval", trained_run, "--attack", "pgd", "--examples", 40, "--steps", 2, "--restarts", 2, "--json",
                    "--data-dir", mnist_dir)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.output)
    assert out["examples"] == 40 and out["attack"] == "PGD-2x2 linf eps=0.3" and out["version"] == 6
    assert 0 <= out["robust_acc"] <= out["clean_acc"] <= 1


def test_eval_save_writes_final_eval_json_for_the_report(tmp_path, trained_run, mnist_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    args = ["--attack", "pgd", "--examples", 20, "--steps", 1, "--restarts", 1, "--data-dir", mnist_dir, "--no-progress"]
    printed = invoke("eval", run_dir, *args, "--json", "--save")
    assert printed.exit_code == 0, printed.stderr
    saved = json.loads((run_dir / "final_eval.json").read_text())
    assert saved == json.loads(printed.output)  # the same object --json prints
    assert saved["examples"] == 20 and saved["version"] == 6
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".final_eval")]  # no temporary file left
    # a checkpoint file inside the run directory saves there too; the report reads the file
    checkpoint = run_dir / "checkpoints" / "ckpt-00000006.h5"
    assert invoke("eval", checkpoint, *args, "--save", "--steps", 2).exit_code == 0
    assert json.loads((run_dir / "final_eval.json").read_text())["attack"] == "PGD-2 linf eps=0.3"
    report = invoke("scaling-report", run_dir, "--out", tmp_path / "report")
    assert report.exit_code == 0, report.stderr
    (described,) = json.loads((tmp_path / "report" / "report.json").read_text())["runs"]
    assert described["final_eval"]["robust_acc"]["value"] == json.loads((run_dir / "final_eval.json").read_text())[
        "robust_acc"]


def test_eval_save_needs_a_run_directory(tmp_path, trained_run):
    loose = tmp_path / "ckpt.h5"
    shutil.copy(trained_run / "checkpoints" / "ckpt-00000006.h5", loose)
    assert_one_line_error(invoke("eval", loose, "--save"), 2, "--save", "not in one")
    assert list(tmp_path.iterdir()) == [loose]


def test_eval_default_attack_is_strong(trained_run):
    result = invoke("eval", "--help")
    assert "default: strong" in result.output
    assert "default: 50" in result.output and "default: 10" in result.output  # PGD's, for --attack pgd


def test_eval_cascade_json_has_each_attack_and_the_masking_gap(trained_run, mnist_dir):
    result = invoke("eval", trained_run, "--examples", 20, "--apgd-steps", 2, "--targets", 2, "--queries", 5,
                    "--json", "--data-dir", mnist_dir, "--threads", 1)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.output)
    assert [row["name"] for row in out["attacks"]] == ["apgd-ce", "apgd-t", "square"]
    assert out["attacks"][-1]["robust_acc"] == out["robust_acc"] <= out["attacks"][0]["robust_acc"]
    assert out["masking_gap"] == pytest.approx(out["attacks"][1]["robust_acc"] - out["robust_acc"])
    assert sum(row["flipped"] for row in out["attacks"]) == round((out["clean_acc"] - out["robust_acc"]) * 20)
    assert out["attack"] == "APGD-CE-2 + APGD-T-2x2 + Square-5 linf eps=0.3"


def test_eval_accepts_l2_budgets_above_one_and_refuses_them_in_linf(trained_run, mnist_dir):
    ok = invoke("eval", trained_run, "--attack", "apgd-ce", "--apgd-steps", 2, "--norm", "l2", "--eps", 2,
                "--examples", 10, "--json", "--data-dir", mnist_dir, "--threads", 1)
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.output)["attack"] == "APGD-CE-2 l2 eps=2"
    assert_one_line_error(invoke("eval", trained_run, "--eps", 2, "--data-dir", mnist_dir), 2, "--eps 2", "linf")
    assert_one_line_error(invoke("train", "--eps", 2, "--norm", "linf", "--run-dir", trained_run.parent / "no"), 2,
                          "--eps 2")
    assert not (trained_run.parent / "no").exists()


def test_periodic_evaluation_with_a_gated_strong_cascade(tmp_path, mnist_dir):
    base = [*FAST, "--data-dir", mnist_dir, "--eval-attack", "strong", "--eval-apgd-steps", 2, "--eval-queries", 5,
            "--eval-examples", 20]
    missed = invoke("train", *base, "--run-dir", tmp_path / "missed", "--target-robust-acc", 0.99)
    assert missed.exit_code == 0, missed.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "missed" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "eval"' in line]
    assert [(r["name"], r["skipped"]) for r in row["attacks"]] == [
        ("pgd", False), ("apgd-ce", True), ("apgd-t", True), ("square", True)]
    assert "skipped" in row["attack"]
    full = invoke("train", *base, "--run-dir", tmp_path / "full")
    assert full.exit_code == 0, full.stderr
    (row,) = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "eval"' in line]
    assert not any(r["skipped"] for r in row["attacks"]) and row["masking_gap"] is not None


def test_config_file_and_command_line_precedence(tmp_path, mnist_dir):
    toml = tmp_path / "run.toml"
    toml.write_text(f'data_dir = "{mnist_dir}"\nsteps = 3\nbatch-size = 50\nattack = "fgsm-rs"\n'
                    'eval_examples = 50\neval_steps = 1\nthreads = 1\n')
    result = invoke("train", "--config", toml, "--steps", 4, "--run-dir", tmp_path / "r", "--no-progress")
    assert result.exit_code == 0, result.stderr
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (config["steps"], config["attack"], config["batch_size"]) == (4, "fgsm-rs", 50)


def test_resume_continues_version_counter(tmp_path, trained_run):
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir)
    result = invoke("train", "--resume", run_dir, "--steps", 9, "--no-progress")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run_dir / "summary.json").read_text())["version"] == 9


def test_help_for_every_command():
    for command in ([], ["train"], ["eval"], ["inspect"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
    assert "--emulate-staleness" in invoke("train", "--help").output


# --- bad input: one line, exit code, nothing written ----------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--eps", "-0.1"], "--eps"),
    (["--eps", "1.5"], "--eps"),
    (["--steps", "-1"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "resnet9000"], "--model"),
    (["--attack", "bim"], "--attack"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--attack-steps-schedule", "5@0.5"], "schedule"),
    (["--bogus-option", "1"], "--bogus-option"),
])
def test_usage_errors(tmp_path, mnist_dir, args, fragment):
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", tmp_path / "r", *FAST, *args)
    assert_one_line_error(result, 2, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--step-size", "inf"], "not a finite number"),  # an infinite step made NaN images and a bogus 0%
    (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--seed", str(2**31)], "--seed"),
    (["--threads", str(10**12)], "--threads"),
    (["--attack", "pgd", "--targets", "10"], "--targets 10: a model of 10 classes has 9 other classes to target"),
])
def test_eval_usage_errors(trained_run, mnist_dir, args, fragment):
    result = invoke("eval", trained_run, "--data-dir", mnist_dir, "--attack", "pgd", "--steps", 1, "--restarts", 1,
                    "--examples", 5, "--no-progress", *args)
    assert_one_line_error(result, 2, fragment)


def test_eval_save_that_cannot_write_still_prints_the_result(tmp_path, trained_run, mnist_dir, monkeypatch):
    import psadv.rundir
    from psadv.errors import StorageError

    def full(path, obj):
        raise StorageError(f"cannot write {path}: No space left on device")

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    monkeypatch.setattr(psadv.rundir, "write_json", full)
    result = invoke("eval", run, "--data-dir", mnist_dir, "--attack", "pgd", "--steps", 1, "--restarts", 1,
                    "--examples", 5, "--no-progress", "--json", "--save")
    assert_one_line_error(result, 1, "final_eval.json: No space left on device")
    assert json.loads(result.stdout)["examples"] == 5  # the numbers the attacks cost are on stdout


def test_a_file_the_system_refuses_is_one_line_and_a_bug_keeps_its_traceback(trained_run, monkeypatch):
    import psadv.report.plot_run as plot_run

    def refused(path, **_):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(plot_run, "read_metrics", refused)
    assert_one_line_error(invoke("plot", trained_run), 1, f"{trained_run / 'metrics.jsonl'}: Permission denied")

    def bug(path, **_):
        raise OSError("no errno: psadv's own mistake")

    monkeypatch.setattr(plot_run, "read_metrics", bug)
    result = invoke("plot", trained_run)
    assert result.exit_code == 1 and isinstance(result.exception, OSError)


def test_unknown_config_key(tmp_path, mnist_dir):
    toml = tmp_path / "bad.toml"
    toml.write_text("epsilon = 0.3\n")
    result = invoke("train", "--config", toml, "--run-dir", tmp_path / "r", *FAST)
    assert_one_line_error(result, 2, "unknown config key 'epsilon'", str(toml))
    assert not (tmp_path / "r").exists()


def test_missing_data_dir(tmp_path):
    result = invoke("train", "--data-dir", tmp_path / "nowhere", "--run-dir", tmp_path / "r", *FAST)
    assert result.exit_code != 0
    assert_one_line_error(result, result.exit_code, "nowhere")
    assert not (tmp_path / "r").exists()


def test_md5_mismatch(tmp_path, mnist_dir):
    bad = tmp_path / "data" / "mnist"
    shutil.copytree(mnist_dir, bad)
    with open(bad / "t10k-labels-idx1-ubyte.gz", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    result = invoke("train", "--data-dir", bad, "--run-dir", tmp_path / "r", *FAST)
    assert result.exit_code == 1
    assert_one_line_error(result, 1, "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")
    assert not (tmp_path / "r").exists()


def test_existing_run_dir_not_clobbered(trained_run, mnist_dir):
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    result = invoke("train", "--data-dir", mnist_dir, "--run-dir", trained_run, *FAST)
    assert_one_line_error(result, 2, "already holds a run", "--resume")
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == before


def test_resume_with_another_model(tmp_path, trained_run):
    before = {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()}
    result = invoke("train", "--resume", trained_run, "--model", "mnist-madry", "--no-progress")
    assert_one_line_error(result, 2, "mnist-small", "mnist-madry")
    assert {p: p.read_bytes() for p in trained_run.rglob("*") if p.is_file()} == before


def test_resume_and_overwrite_exclusive(trained_run):
    result = invoke("train", "--resume", trained_run, "--overwrite")
    assert_one_line_error(result, 2, "--resume", "--overwrite")


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all" * 10])
def test_bad_checkpoint_files(tmp_path, content):
    path = tmp_path / "ckpt.h5"
    path.write_bytes(content)
    for command in ("inspect", "eval"):
        result = invoke(command, path)
        assert result.exit_code == 1
        assert_one_line_error(result, 1, str(path))


def test_truncated_checkpoint(tmp_path, trained_run):
    source = trained_run / "checkpoints" / "ckpt-00000006.h5"
    path = tmp_path / "cut.h5"
    path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    assert_one_line_error(invoke("eval", path), 1, str(path))


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(invoke("inspect", tmp_path / "nothing.h5"), 1, "nothing.h5")
