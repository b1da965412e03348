"""The documentation and the results records: the schema, the generated pages, the README's length,
and every ``psadv`` command in the README, the docs and the records parsed by psadv's own CLI."""

import re
import shlex
import sys
import tomllib
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import render_docs  # noqa: E402 - scripts/render_docs.py
import results  # noqa: E402 - scripts/results.py

from psadv.cli import cli  # noqa: E402

README_MAX_LINES = 250
FENCE = re.compile(r"^```(\w*)\s*$")
LAUNCHERS = {"mpiexec", "mpirun", "srun"}


def _record(**overrides) -> dict:
    """A valid record, with some keys replaced (None: removed)."""
    record = {
        "id": "sample", "title": "A sample", "question": "What?", "status": "current", "date": "2026-12-06",
        "commit": "abc1234", "page": "performance", "seeds": [0, 1], "commands": ["psadv train --epochs 1"],
        "summary": "It works.", "machine": {"cpu": "AMD EPYC VM (2 vCPUs)", "cores": 2, "bfloat16": True, "gpu": "none"},
        "evaluation": {"attack": "", "examples": 0},
        "table": {"columns": ["setting", "seed", "strong %"], "rows": [["default", 0, 88.1]]},
    }
    for key, value in overrides.items():
        if value is None:
            record.pop(key)
        else:
            record[key] = value
    return record


def test_every_record_in_results_follows_the_schema():
    records = results.load()
    assert len(records) >= 30
    assert {r["page"] for r in records.values() if r["status"] == "current"} == set(results.PAGES) - {"archive"}
    # every archived record points to what replaced it, and that is a current record
    for record in records.values():
        if record["status"] == "archived":
            assert records[record["superseded_by"]]["status"] == "current", record["id"]


def test_a_valid_record_passes_and_is_rendered_with_its_numbers():
    record = results.validate(_record(), "sample")
    pages = results.render({"sample": record})
    page = pages["performance.md"]
    assert '<a id="sample"></a>' in page and "| default | 0 | 88.1 |" in page
    assert "psadv train --epochs 1" in page and "abc1234" in page
    assert "[A sample](performance.md#sample)" in pages["index.md"]


@pytest.mark.parametrize("overrides, message", [
    ({"commit": None}, "missing key 'commit'"),
    ({"id": "other"}, "must equal the file's stem"),
    ({"status": "old"}, "status must be one of"),
    ({"page": "misc"}, "page must be one of"),
    ({"page": "archive"}, "archived records only"),
    ({"date": "2026-13-01"}, "not a calendar date"),
    ({"date": "6 Dec 2026"}, "YYYY-MM-DD"),
    ({"commit": "HEAD"}, "hex digits"),
    ({"seeds": [0, -1]}, "non-negative integers"),
    ({"commands": []}, "non-empty list"),
    ({"summary": "  "}, "'summary' is empty"),
    ({"speedup": 8.0}, "unknown key 'speedup'"),
    ({"machine": {"cpu": "x", "cores": True, "bfloat16": True, "gpu": "none"}}, "'cores' must be an integer"),
    ({"machine": {"cpu": "x", "cores": 2, "bfloat16": True}}, "missing key 'gpu'"),
    ({"evaluation": {"attack": "pgd", "examples": -1}}, "examples must be 0 or more"),
    ({"table": {"columns": ["a", "b"], "rows": [["x"]]}}, "row 1 must be a list of 2 cells"),
    ({"table": {"columns": ["a"], "rows": []}}, "rows is empty"),
    ({"superseded_by": "sample-2"}, "superseded_by is for archived records"),
])
def test_a_record_that_breaks_the_schema_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(results.RecordError, match=re.escape(message)):
        results.validate(_record(**overrides), "sample")


def test_a_broken_file_in_results_is_one_error_naming_it(tmp_path):
    (tmp_path / "good.toml").write_text('id = "good"\n')
    with pytest.raises(results.RecordError, match=r"results/good.toml: missing key"):
        results.load(tmp_path, docs=None)
    (tmp_path / "good.toml").write_text("id = [unclosed\n")
    with pytest.raises(results.RecordError, match=r"results/good.toml: not valid TOML"):
        results.load(tmp_path, docs=None)


def test_links_and_successors_must_exist(tmp_path):
    docs = tmp_path / "docs"
    (docs / "design").mkdir(parents=True)
    (docs / "design" / "staleness.md").write_text("# x\n")
    assert results.validate(_record(links=["design/staleness.md#why"]), "sample", docs)
    with pytest.raises(results.RecordError, match="names no page under docs/"):
        results.validate(_record(links=["design/nowhere.md"]), "sample", docs)
    store = tmp_path / "results"
    store.mkdir()
    archived = _record(id="old", status="archived", superseded_by="missing")
    (store / "old.toml").write_text(_toml(archived))
    with pytest.raises(results.RecordError, match="superseded_by names no record: 'missing'"):
        results.load(store, docs=None)


def _toml(record: dict) -> str:
    """Just enough TOML for the records these tests write."""
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return '"' + v.replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in record.items() if not isinstance(v, dict)]
    for k, v in record.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    text = "\n".join(lines) + "\n"
    assert tomllib.loads(text) == record  # the helper writes what it was given
    return text


def test_the_generated_pages_match_a_fresh_render():
    """docs/reference/{configuration,cli}.md and docs/results/*.md are written by scripts/render_docs.py."""
    stale = render_docs.stale(render_docs.pages())
    assert not stale, f"out of date: {stale}; run python scripts/render_docs.py"


def test_an_edited_results_page_is_detected(tmp_path):
    records = results.load()
    results.write(records, tmp_path)
    assert results.stale_pages(records, tmp_path) == []
    page = tmp_path / "training.md"
    page.write_text(page.read_text().replace("8.0×", "9.0×"))
    (tmp_path / "extra.md").write_text("# hand-written\n")
    assert results.stale_pages(records, tmp_path) == ["training.md", "extra.md"]


def test_the_configuration_reference_holds_every_option_with_its_reason():
    from psadv.config import FIELDS

    page = (ROOT / "docs" / "reference" / "configuration.md").read_text()
    for name in FIELDS:
        assert f'<a id="{name.replace("_", "-")}"></a>' in page, name
    # the why-comment above a field in psadv/config.py reaches the page, its record as a link
    assert "[max-in-flight](../results/scaling.md#max-in-flight)" in page
    why, section = render_docs.field_comments((ROOT / "psadv" / "config.py").read_text())
    assert "results/max-in-flight.toml" in why["max_in_flight"] and section["max_in_flight"].startswith("the parameter server")
    assert section["dataset"] == "data" and why["log"].startswith("metrics.jsonl is always written")


def test_comments_cite_records_and_pages_not_readme_sections():
    cited = []
    for path in [*ROOT.glob("psadv/**/*.py"), *ROOT.glob("scripts/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        cited += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"README[^\n]{0,40}", text)]
        for rid in re.findall(r"results/([a-z0-9-]+)\.toml", text):
            if rid != "id" and not (ROOT / "results" / f"{rid}.toml").is_file():
                cited.append(f"{path.relative_to(ROOT)}: cites a missing record results/{rid}.toml")
    assert not cited


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


def _shell_lines(text: str):
    """Command lines of the fenced bash/sh blocks of a markdown text, continuations joined."""
    in_block, pending = False, ""
    for line in text.splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            in_block = not in_block and fence.group(1) in ("bash", "sh", "shell", "console")
            pending = ""
            continue
        if not in_block:
            continue
        line = line.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""


def _psadv_args(line: str) -> list[list[str]]:
    """The argument lists psadv's parser must accept in one shell line: a `psadv …` command (also
    under mpiexec/srun), the `psadv train` flags of a sweep after `--`, and the budget search's recipes."""
    line = line.lstrip("$ ")
    try:
        words = shlex.split(line, comments=True)
    except ValueError as exc:
        raise AssertionError(f"cannot split {line!r}: {exc}") from None
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words and words[0] in LAUNCHERS and "psadv" in words:
        words = words[words.index("psadv"):]
    if words[:1] == ["psadv"]:
        return [words[1:]]
    if len(words) > 1 and words[0].startswith("python") and words[1].endswith("budget_search.py"):
        return [["train", *shlex.split(spec.partition("=")[2])]
                for flag, spec in zip(words, words[1:]) if flag == "--recipe"]
    return []


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for path in sources:
        for line in _shell_lines(path.read_text(encoding="utf-8")):
            found += [(f"{path.relative_to(ROOT)}: {line}", args) for args in _psadv_args(line)]
    for path in sorted((ROOT / "results").glob("*.toml")):
        for line in tomllib.loads(path.read_text(encoding="utf-8"))["commands"]:
            found += [(f"{path.relative_to(ROOT)}: {line}", args) for args in _psadv_args(line)]
    return found


def _parse(args: list[str]) -> None:
    """Parse ``psadv ARGS`` with the CLI's own click parser, without running the command."""
    group_ctx = click.Context(cli, info_name="psadv", **cli.context_settings)
    if not args or args[0].startswith("-"):
        cli.make_context("psadv", list(args))
        return
    command = cli.get_command(group_ctx, args[0])
    if command is None:
        raise click.UsageError(f"no such command {args[0]!r}")
    ctx = command.make_context(args[0], list(args[1:]), parent=group_ctx)
    if args[0] == "train":
        _check_config(ctx.params)
    trailing = ctx.meta.get("trailing")
    if trailing:  # a sweep's flags for every psadv train
        train = cli.get_command(group_ctx, "train")
        _check_config(train.make_context("train", list(trailing), parent=group_ctx).params)


def _check_config(params: dict) -> None:
    """A fresh run's options as psadv train checks them before it starts (ranges, and options the
    rest of the config would ignore), without a checkpoint, a TOML file or a factory to import."""
    from psadv.config import FIELDS, make_config
    from psadv.errors import PsadvError

    if params["resume"] or params["config_file"] or ":" in (params.get("model") or ""):
        return
    # the config's own fields: the command's other flags (--overwrite, --progress, ...) are not config
    options = {k: v for k, v in params.items() if v is not None and k in FIELDS}
    try:
        make_config(options)
    except PsadvError as exc:
        raise click.UsageError(str(exc)) from None


def test_every_psadv_command_in_the_readme_docs_and_records_parses():
    commands = _commands()
    readme = [c for c in commands if c[0].startswith("README.md")]
    assert len(readme) >= 8 and len(commands) >= 80  # the extraction finds them, it does not skip them
    assert {args[0] for _, args in readme} >= {"train", "eval", "scaling-report", "export"}
    failures = []
    for where, args in commands:
        try:
            _parse(args)
        except click.ClickException as exc:
            failures.append(f"{where}\n    {exc.format_message()}")
    assert not failures, "\n".join(failures)


def test_a_command_that_rots_is_caught():
    """The parse check fails on a renamed option or a value out of range, as it must."""
    for line in ["psadv train --epoch 15", "psadv eval runs/x --attack strongest", "psadv train --eps-ramp 2",
                 "mpiexec -n 3 psadv train --max-stalenes 4",
                 "psadv scaling-report --out r --workers 0,1 -- --attack-step 10",
                 "python scripts/budget_search.py --recipe a='--precision fp16'",
                 "psadv train --attack fgsm --attack-steps 10", "psadv train --momentum 0.5"]:
        (args,) = _psadv_args(line)
        with pytest.raises(click.ClickException):
            _parse(args)


def test_the_readme_set_up_is_what_ci_runs():
    """README's two set-up commands are the ones .ci/run runs on a clean clone (pip's -q aside)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    set_up = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line, comments=True) for line in _shell_lines(set_up)]
    assert len(commands) == 2 and commands[1] == ["python3", "-m", "pytest"]
    ci = [[w for w in shlex.split(line, comments=True) if w != "-q"]
          for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    for command in commands:
        assert command in ci, f"README's {' '.join(command)!r} is not what .ci/run runs"


def test_the_readme_links_reach_their_pages_and_records():
    """mkdocs build --strict checks the links inside docs/; the README is outside it, so here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    local = [(path, anchor) for path, anchor in links if not re.match(r"https?:", path)]
    assert len(local) >= 20
    for path, anchor in local:
        target = ROOT / path
        assert target.is_file(), f"README links to a missing file: {path}"
        if anchor:
            text = target.read_text(encoding="utf-8")
            headings = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
            assert f'<a id="{anchor}"></a>' in text or anchor in headings, f"README: {path}#{anchor} has no anchor"
