"""`lmkern info`, `lmkern check` and `lmkern bench`: what lmkern sees here, its kernels
checked against torch here (lmkern/check.py), and the benchmark suite."""

from lmkern import check


def info(args):
    from lmkern.info import report

    print(report())


def bench(args):
    try:
        from lmkern.benchmarks.run import main as run_benchmarks
    except ModuleNotFoundError as error:
        if error.name not in ("lmkern.benchmarks", "lmkern.benchmarks.run"):
            raise
        try:  # a source checkout: benchmarks/ at the repository root, the working directory
            from benchmarks.run import main as run_benchmarks
        except ModuleNotFoundError as error:
            if error.name not in ("benchmarks", "benchmarks.run"):
                raise
            raise FileNotFoundError(
                "the benchmark suite is not installed: run `python -m lmkern bench` from the repository root"
            ) from None
    return run_benchmarks(args.bench_args)


def add_parser(commands):
    bench_parser = commands.add_parser(
        "bench", add_help=False, help="run the benchmark suite (`lmkern bench --help` lists its options)"
    )
    bench_parser.set_defaults(run=bench)
    commands.add_parser("info", help="versions, devices and which backend runs where").set_defaults(run=info)
    check_parser = commands.add_parser(
        "check", help="fused cross-entropy on every backend here, checked against torch and timed",
        description="A first look at the kernels: lmkern's fused cross-entropy on every backend this machine can run, "
        "checked against torch.nn.functional.cross_entropy (exit status 1 if one disagrees), with forward+backward "
        "timings.",
    )
    check.add_arguments(check_parser)
    check_parser.set_defaults(run=check.check)
