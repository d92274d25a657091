"""The benchmark runner fails loudly: a case that raises is recorded with its error, every
op still runs, and the run exits non-zero (CI's bench-quick then fails). benchmarks.compare
sets two runs side by side."""

import json

try:
    import lmkern.benchmarks.compare as compare
    import lmkern.benchmarks.run as runner
    from lmkern.benchmarks.harness import Provider
except ModuleNotFoundError:  # a source checkout without the installed package
    import benchmarks.compare as compare
    import benchmarks.run as runner
    from benchmarks.harness import Provider


def test_a_case_that_raises_fails_the_run_after_every_op(monkeypatch, tmp_path, capsys):
    module = runner.OPS["cross_entropy"]
    providers = module.providers

    def with_a_broken_one(device, dtype):
        return [*providers(device, dtype), Provider("broken", run=lambda *inputs: 1 / 0)]

    monkeypatch.setattr(module, "providers", with_a_broken_one)
    argv = ["--op", "cross_entropy", "--op", "layer_norm", "--quick", "--out", str(tmp_path)]
    assert runner.main(argv) == 1
    err = capsys.readouterr().err
    assert "benchmark case(s) raised" in err and "cross_entropy" in err and "broken: ZeroDivisionError" in err
    recorded = json.loads((tmp_path / "cross_entropy.json").read_text())
    assert any(row["provider"] == "broken" and row["error"].startswith("ZeroDivisionError") for row in recorded["rows"])
    assert (tmp_path / "layer_norm.json").exists()  # the next op ran all the same
    monkeypatch.setattr(module, "providers", providers)
    assert runner.main(["--op", "cross_entropy", "--quick", "--out", str(tmp_path)]) == 0


def test_compare_pairs_the_rows_both_runs_measured(tmp_path):
    def result(commit, native_ms, extra_rows=()):
        rows = [
            dict(label="1024", pass_name="fwd", provider="lmkern native", median_ms=native_ms),
            dict(label="1024", pass_name="fwd", provider="broken", error="ZeroDivisionError"),
            *extra_rows,
        ]
        return dict(op="layer_norm", dtype="float32", commit=commit, date="today", rows=rows)

    for name, content in [
        ("before", result("aaa", 2.0)),
        ("after", result("bbb", 1.0, [dict(label="4096", pass_name="fwd", provider="lmkern native", median_ms=3.0)])),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "layer_norm.json").write_text(json.dumps(content))
    compare.main([str(tmp_path / "before"), str(tmp_path / "after"), "--out", str(tmp_path / "compare.md")])
    table = (tmp_path / "compare.md").read_text()
    assert "before: commit aaa" in table and "after: commit bbb" in table
    assert "| 1024 | fwd | lmkern native | 2.000 | 1.000 | 0.50 |" in table
    assert "broken" not in table and "| 4096 |" not in table  # an error, and a case only one run has
