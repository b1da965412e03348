"""metrics.jsonl rows: one schema (psadv.metrics.SCHEMA) for every writer."""

import pytest

from psadv.metrics import SCHEMA, MetricsLog, row_problems, well_typed
from psadv.rundir import read_metrics
from psadv.runsetup import resolve_run
from psadv.single import train_single


@pytest.mark.parametrize("emulate", [{"emulate_staleness": 1}, {"emulate_attackers": 2, "max_staleness": 0, "push": "examples"}])
def test_rows_of_a_real_single_process_run_match_the_schema(tmp_path, mnist_dir, emulate):
    overrides = dict(data_dir=str(mnist_dir), run_dir=str(tmp_path / "run"), steps=6, batch_size=50, attack_steps=1,
                     eval_examples=50, eval_steps=1, eval_every=3, log_every=2, threads=1, **emulate)
    train_single(resolve_run(overrides), show_progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert {r["kind"] for r in rows} == {"train", "eval", "end"}
    assert [row_problems(r) for r in rows] == [[]] * len(rows)
    # and the reader's type check keeps every one of them (it skips rows that fail it)
    assert len(rows) == len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert all(map(well_typed, rows))


def test_the_log_refuses_rows_outside_the_schema(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="unknown row kind 'trian'"):
        log.write("trian", version=1)
    with pytest.raises(ValueError, match="lacks reason"):
        log.write("rejected", version=1, sender=2)
    with pytest.raises(ValueError, match="undeclared colour"):
        log.write("rejected", version=1, sender=2, reason="NaN", colour="red")
    log.write("rejected", version=1, sender=2, reason="NaN")
    log.close()
    assert [r["kind"] for r in read_metrics(tmp_path / "m.jsonl")] == ["rejected"]
    assert set(SCHEMA) == {"world", "train", "attacker", "eval", "rejected", "end"}


def test_the_report_reads_only_declared_fields():
    from psadv.report.runs import ROW_FIELDS

    for kind, fields in ROW_FIELDS.items():
        assert set(fields) <= SCHEMA[kind].required, kind


def test_well_typed_bounds_the_axes_and_keeps_a_diverging_loss():
    row = {"kind": "train", "version": 5, "time": 1.5, "wall": 1.8e9, "attack": "PGD-5"}
    assert well_typed(row) and well_typed({**row, "loss": 1e20})  # a diverging run's rows stay readable
    for bad in ({"version": "5"}, {"version": -1}, {"version": 1.5}, {"time": 1e308}, {"loss": 1e300},
                {"eps": "0.3"}):
        assert not well_typed({**row, **bad}), bad
