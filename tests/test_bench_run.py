"""The benchmark runner fails loudly: a case that raises is recorded with its error, every
op still runs, and the run exits non-zero (CI's bench-quick then fails)."""

import json

try:
    import lmkern.benchmarks.run as runner
    from lmkern.benchmarks.harness import Provider
except ModuleNotFoundError:  # a source checkout without the installed package
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
