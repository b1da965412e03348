"""psadv eval and psadv.evaluate: options the attacks do not read are refused, the ecosystem's
spellings (Linf, 8/255) are accepted, the JSON names what was measured, and --claim writes a
RobustBench-style claim."""

import json

import pytest

import psadv
from cli_helpers import assert_one_line_error, invoke
from psadv.attacks.suite import EvalSettings, resolve
from psadv.claim import eps_text
from psadv.config import make_config, parse_number, read_toml
from psadv.errors import ConfigError

FAST = ["--threads", 1, "--no-progress"]


# --- what each attack reads ------------------------------------------------------------------------

@pytest.mark.parametrize("attack, given, refused", [
    ("strong", {"steps": 20, "restarts": 1}, "--steps sets the steps of PGD, and --attack strong "
                                             "(apgd-ce+apgd-t+square) does not read it"),
    ("autoattack", {"loss": "margin"}, "--loss"),
    ("pgd", {"queries": 10}, "--queries sets the queries of Square, and --attack pgd does not read it"),
    ("pgd", {"apgd_steps": 10}, "--apgd-steps"),
    ("apgd-ce", {"targets": 3}, "--targets sets the target classes of APGD-T and FAB-T"),
    ("square", {"step_size": 0.1}, "--step-size"),
    ("fgsm", {"steps": 3}, "--steps"),  # one step, always
    ("fgsm", {"restarts": 3}, "--restarts"),  # no random start: a restart repeats the same attack
    ("none", {"loss": "ce"}, "--loss"),
])
def test_options_the_attacks_do_not_read_are_refused(attack, given, refused):
    with pytest.raises(ConfigError, match="leave it out") as error:
        resolve(attack, given, norm="linf", eps=0.3, classes=10)
    assert refused in str(error.value)


def test_options_the_attacks_read_are_taken_and_the_rest_keep_the_shared_defaults():
    (pgd,) = resolve("pgd", {"steps": 7, "restarts": 2, "loss": "margin", "queries": None}, norm="Linf", eps=0.1,
                     classes=10)
    assert pgd.describe() == "PGD-7x2 linf eps=0.1 margin"
    (rs,) = resolve("fgsm-rs", {"restarts": 3, "step_size": 0.05}, norm="l2", eps=1.0, classes=10)
    assert rs.used_settings() == {"norm": "l2", "eps": 1.0, "restarts": 3, "step_size": 0.05, "loss": "ce"}
    strong = resolve(None, {"apgd_steps": 4, "queries": 9}, norm="linf", eps=0.3, classes=4)
    assert [a.label() for a in strong] == ["APGD-CE-4", "APGD-T-4x3", "Square-9"]  # 4 classes: 3 to target
    (default,) = resolve("pgd", {}, norm="linf", eps=0.3, classes=10)
    assert default.used_settings()["steps"] == EvalSettings.steps == 50  # the one source of the defaults
    with pytest.raises(ConfigError, match="--targets 10: a model of 10 classes has 9 other classes to target"):
        resolve("apgd-t", {"targets": 10}, norm="linf", eps=0.3, classes=10)


def test_the_command_the_function_and_the_grading_read_one_source_of_defaults():
    import dataclasses
    import inspect

    from psadv.api import evaluate
    from psadv.attacks.suite import OPTIONS, EvalRun
    from psadv.cli import cli
    from psadv.config import FIELDS
    from psadv.grading import prepare_evaluation

    command = {param.name: param for param in cli.commands["eval"].params}
    function = inspect.signature(evaluate).parameters
    grading = inspect.signature(prepare_evaluation).parameters
    for field in dataclasses.fields(EvalRun):
        assert command[field.name].default == function[field.name].default == grading[field.name].default == \
            field.default, field.name
    for option in OPTIONS:  # not given, so that an option no attack reads is refused; its default is EvalSettings'
        assert command[option].default is None and function[option].default is None, option
        if option not in ("step_size", "targets"):  # these two depend on ε and the model's classes
            assert f"[default: {getattr(EvalSettings, option)}]" in command[option].help, option
    assert f"[default: {EvalSettings.targets}," in command["targets"].help
    # the one default of their own (EvalRun says why): the function moves the module it is given
    assert (command["device"].default, function["device"].default) == ("auto", "cpu")
    # periodic evaluation's strong budgets are psadv eval's (config.py does not import the attacks)
    assert (FIELDS["eval_apgd_steps"].default, FIELDS["eval_queries"].default) == (EvalSettings.apgd_steps,
                                                                                     EvalSettings.queries)


def test_eval_and_the_api_refuse_them_with_one_line(tiny_run, mnist_dir):
    args = [tiny_run, "--data-dir", mnist_dir, *FAST]
    assert_one_line_error(invoke("eval", *args, "--steps", 20, "--restarts", 1), 2, "--steps", "--attack strong")
    assert_one_line_error(invoke("eval", *args, "--attack", "pgd", "--queries", 10), 2, "--queries", "--attack pgd")
    with pytest.raises(ConfigError, match="--steps sets the steps of PGD, and --attack strong"):
        psadv.evaluate(tiny_run, data_dir=mnist_dir, steps=20, restarts=1)


# --- conventions: Linf/L2, 8/255 -------------------------------------------------------------------

def test_fractions_and_norm_spellings_in_the_config_and_on_the_command_line(tmp_path):
    assert parse_number("8/255", "--eps") == 8 / 255 and parse_number(" 0.5 ", "--eps") == 0.5
    for junk in ("8/", "eight", "8/0", "1/2/3", "nan", ""):
        with pytest.raises(ConfigError, match="--eps must be a"):
            parse_number(junk, "--eps")
    cfg = make_config({"eps": "2/255", "norm": "Linf"})
    assert (cfg.eps, cfg.norm) == (2 / 255, "linf")
    assert make_config({"norm": "L2", "eps": 1.5}).norm == "l2"
    toml = tmp_path / "c.toml"
    toml.write_text('eps = "8/255"\nnorm = "LINF"\n')
    assert read_toml(toml) == {"eps": 8 / 255, "norm": "linf"}
    toml.write_text('eps = "8/255x"\n')
    with pytest.raises(ConfigError, match=r"eps in .*c.toml must be a number or a fraction such as 8/255, got '8/255x'"):
        read_toml(toml)
    with pytest.raises(ConfigError, match="unknown value 'L3'"):
        make_config({"norm": "L3"})
    result = invoke("train", "--eps", "8/255x", "--run-dir", tmp_path / "r")
    assert_one_line_error(result, 2, "'--eps'", "not a number or a fraction such as 8/255")
    assert_one_line_error(invoke("train", "--norm", "L3", "--run-dir", tmp_path / "r"), 2, "--norm")
    assert not (tmp_path / "r").exists()


def test_eval_takes_linf_and_fractions_and_its_json_names_what_it_measured(tiny_run, mnist_dir):
    result = invoke("eval", tiny_run, "--data-dir", mnist_dir, "--attack", "pgd", "--steps", 1, "--restarts", 1,
                    "--examples", 4, "--norm", "Linf", "--eps", "8/255", "--step-size", "2/255", "--json", *FAST)
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert (out["dataset"], out["norm"], out["eps"], out["model"], out["version"]) == (
        "mnist", "linf", 8 / 255, "mnist-small", 2)
    assert out["psadv_version"] == psadv.__version__ and out["threads"] == 1
    assert out["attacks"][0]["settings"] == {"norm": "linf", "eps": 8 / 255, "steps": 1, "restarts": 1,
                                             "step_size": 2 / 255, "loss": "ce"}
    api = psadv.evaluate(tiny_run, data_dir=mnist_dir, attack="pgd", steps=1, restarts=1, examples=4, norm="Linf",
                         eps="8/255", step_size="2/255", threads=1)
    assert {k: api[k] for k in ("dataset", "norm", "eps", "model", "version")} == {
        k: out[k] for k in ("dataset", "norm", "eps", "model", "version")}
    assert api["clean_acc"] == out["clean_acc"] and api["robust_acc"] == out["robust_acc"]


def test_a_file_data_set_must_be_given_its_eps():
    with pytest.raises(ConfigError, match="--dataset npz has no recipe of defaults, so no ε of its own: give --eps"):
        make_config({"dataset": "npz"})
    assert make_config({"dataset": "hdf5", "eps": "8/255"}).eps == 8 / 255


# --- a RobustBench-style claim ------------------------------------------------------------------------

def test_eps_as_robustbench_writes_it():
    assert [eps_text(e) for e in (8 / 255, 4 / 255, 0.3, 0.5, 1.0, 2.0)] == ["8/255", "4/255", "0.3", "0.5", "1", "2"]


def test_claim_file(tiny_run, mnist_dir, tmp_path):
    claim = tmp_path / "claim.json"
    args = [tiny_run, "--data-dir", mnist_dir, "--examples", 6, "--apgd-steps", 1, "--targets", 1, "--queries", 3,
            *FAST]
    result = invoke("eval", *args, "--attack", "autoattack", "--claim", claim, "--json")
    assert result.exit_code == 0, result.stderr
    record, written = json.loads(result.stdout), json.loads(claim.read_text())
    assert {k: written[k] for k in ("dataset", "threat_model", "eps", "architecture", "additional_data",
                                    "number_forward_passes")} == {
        "dataset": "mnist", "threat_model": "Linf", "eps": "0.3", "architecture": "mnist-small",
        "additional_data": False, "number_forward_passes": 1}
    assert written["clean_acc"] == f"{100 * record['clean_acc']:.2f}"
    assert written["autoattack_acc"] == f"{100 * record['robust_acc']:.2f}"
    how = written["psadv"]
    assert how["version"] == psadv.__version__ and how["examples"] == 6 and how["test_examples"] == 10000
    assert [row["attack"].split()[0] for row in how["attacks"]] == ["APGD-CE-1", "APGD-T-1x1", "FAB-T-1x1", "Square-3"]
    assert how["standard_autoattack"] is False
    assert how["differs_from_standard"] == ["first 6 of 10000 test examples", "apgd_steps 1 (standard: 100)",
                                            "queries 3 (standard: 5000)", "targets 1 (standard: 9)"]
    assert how["command"].startswith(f"psadv eval {tiny_run / 'checkpoints'}") and "--attack autoattack" in how["command"]
    assert "--examples 6" in how["command"] and "not the autoattack package" in how["implementation"]
    # never over an existing file, only of AutoAttack, and both refused before any attacking
    assert_one_line_error(invoke("eval", *args, "--attack", "autoattack", "--claim", claim), 2, "exists")
    assert_one_line_error(invoke("eval", *args, "--attack", "strong", "--claim", tmp_path / "b.json"), 2,
                          "--claim records AutoAttack's accuracy", "--attack autoattack")
    assert_one_line_error(invoke("eval", *args, "--attack", "autoattack", "--claim", tmp_path / "no" / "c.json"), 2,
                          "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["claim.json"]
