"""Command line: ``sparsekernels {info,bench,demo,spdy}`` (also ``python -m sparsekernels``)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .formats.masks import check_sparsity


def _cmd_info(args) -> int:
    from .info import collect

    info = collect()
    if args.json:  # plain JSON needs no rich: the GPU machine may not have it
        print(json.dumps(info, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="sparsekernels", show_header=False)
    for key, value in info.items():
        if key == "load_error" and value is None:
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)
    return 0


def _shapes_arg(text: str) -> list[tuple[int, int, int]]:
    """--shapes: "B,IN,OUT;B,IN,OUT" as positive int triples (argparse reports a bad one)."""
    shapes = []
    for part in text.split(";"):
        try:
            b, i, o = (int(v) for v in part.strip().split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected B,IN,OUT integer triples separated by ';' "
                                             f"(e.g. '256,4096,4096;2048,768,3072'), got {part.strip()!r}") from None
        if min(b, i, o) <= 0:
            raise argparse.ArgumentTypeError(f"B, IN and OUT must be positive, got {part.strip()!r}")
        shapes.append((b, i, o))
    return shapes


def _sparsity_arg(text: str) -> float:
    try:
        return check_sparsity(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sparsities_arg(text: str) -> list[float]:
    """--sparsities: comma-separated sparsities in [0, 1)."""
    return [_sparsity_arg(part) for part in text.split(",")]


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_bench_training(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench import harness, training

    console = Console(width=None if sys.stdout.isatty() else 160)
    kwargs = {"hidden": args.hidden, "steps": args.steps, "sparsity": args.sparsity}
    if args.quick:
        kwargs.update(hidden=1024, steps=5)
    with Progress(console=console, transient=True) as progress:
        total = kwargs["steps"] + 3  # the timed steps and the warm-up (time_steps' default)
        task = progress.add_task("training steps (the methods interleaved)", total=total)
        results = training.compare(progress=lambda i: progress.update(task, completed=i), **kwargs)
    machine = harness.machine_info("cpu")
    console.print(f"machine: {harness.describe_cpu(machine)}, {machine['threads']} threads")
    table = Table(title=f"MLP 1024-{kwargs['hidden']}-{kwargs['hidden']}-256, batch 256, Adam, sparsity "
                        f"{kwargs['sparsity']} (ERK): median per-step wall-clock, the methods' steps interleaved")
    for col in ("method", "median ms / step", "x dense", "mean ms / step (updates included)", "x dense (mean)",
                "params", "topology updates", "update cost (dense steps)"):
        table.add_column(col, justify="right")
    for m, r in results.items():
        cost = r.get("update_cost_dense_steps")
        table.add_row(m, f"{r['median_step_s'] * 1e3:.1f}", f"{r['speedup_vs_dense']:.2f}",
                      f"{r['mean_step_s'] * 1e3:.1f}", f"{r['mean_speedup_vs_dense']:.2f}", f"{r['params']:,}",
                      str(r["updates"]), "-" if cost is None else f"{cost:.2f}")
    console.print(table)
    wide = kwargs["hidden"] >= 4096
    for name, goal in (("rigl", 3.0), ("static", 4.0)):
        got = results[name]["mean_speedup_vs_dense"]
        verdict = ("met" if got >= goal else "MISSED") if wide else "not shown by this run (width < 4096)"
        console.print(f"{name}: mean wall-clock per step (updates included) vs dense {got:.2f}x "
                      f"(target >= {goal}x at width >= 4096: {verdict})")
    cost = results["rigl"].get("update_cost_dense_steps")
    if cost is not None:
        verdict = ("met" if cost <= 2.0 else "MISSED") if wide else "not shown by this run (width < 4096)"
        console.print(f"rigl: one topology update of the whole model costs {cost:.2f} dense training steps "
                      f"(target <= 2: {verdict})")
    else:
        console.print("rigl / set: no topology update fell inside this run's timed steps, so the update-cost "
                      "column is empty; more --steps (or a run without --quick) shows it")
    out = args.out or harness.result_path("training", "cpu")
    payload = {"benchmark": "training_step", "machine": machine, "config": kwargs,
               "results": {m: {k: v for k, v in r.items()} for m, r in results.items()}}
    console.print(f"results: {harness.write_json(out, payload)}")
    return 0


def _cmd_bench_phases(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench import harness, phases

    console = Console(width=None if sys.stdout.isatty() else 160)
    # --steps: AC/DC steps per phase type, spread over its phases (3 C, 2 D + the warm-up).
    kwargs = {"hidden": args.hidden, "sparsity": args.sparsity, "phase_steps": max(2, args.steps // 3)}
    if args.quick:
        kwargs.update(hidden=min(args.hidden, 1024), phase_steps=2)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("AC/DC phases vs dense", total=None)
        payload = phases.run(progress=lambda done, total: progress.update(task, completed=done, total=total),
                             **kwargs)
    sizes = "-".join(map(str, payload["config"]["sizes"]))
    table = Table(title=f"AC/DC vs dense, MLP {sizes}, batch {payload['config']['batch']}, Adam, "
                        f"{kwargs['sparsity']:.0%} global magnitude ({payload['machine']['cpu']}): median per step")
    for col in ("phase", "steps", "AC/DC ms / step", "dense ms / step", "x dense (median of step pairs)"):
        table.add_column(col, justify="right")
    for phase, label in (("sparse", "compressed (C)"), ("dense", "decompressed (D)")):
        r = payload["phases"][phase]
        table.add_row(label, str(r["steps"]), f"{r['median_step_s'] * 1e3:.1f}", f"{r['dense_median_step_s'] * 1e3:.1f}",
                      f"{r['speedup_vs_dense']:.2f}")
    console.print(table)
    if min(payload["phases"][p]["steps"] for p in ("sparse", "dense")) < 5:
        # With a handful of pairs the median of the paired ratios (what the targets use:
        # each AC/DC step against the dense step next to it) and the ratio of the two
        # separate ms medians can point opposite ways.
        console.print("few steps per phase: the ms medians and the paired ratio may disagree; more --steps (or a "
                      "run without --quick) settles them")
    ts = Table(title="phase switches (cost in dense steps)")
    for col in ("after step", "enters", "ms", "dense steps"):
        ts.add_column(col, justify="right")
    for s in payload["switches"]:
        ts.add_row(str(s["step"]), "compressed" if s["entered"] == "sparse" else "decompressed",
                   f"{s['seconds'] * 1e3:.1f}", f"{s['dense_steps']:.2f}")
    console.print(ts)
    tt = Table(title="targets (this run)")
    for col in ("target", "reached", "goal", ""):
        tt.add_column(col)
    for t in payload["targets"]:
        tt.add_row(t["target"], f"{t['value']:.2f}", t["goal"], "met" if t["met"] else "MISSED")
    console.print(tt)
    path = harness.write_json(args.out or phases.default_path(), payload)
    console.print(f"results: {path}")
    if not args.no_plot:
        try:
            console.print(f"plot: {phases.plot(payload, path[:-5] + '.png')}")
        except ImportError:
            console.print("plot skipped (matplotlib is not installed)")
    return 0


def _cmd_bench_ensembles(args) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench import ensembles, harness

    console = Console(width=None if sys.stdout.isatty() else 160)
    kwargs = {"sparsity": args.sparsity}
    if args.quick:
        kwargs.update(hidden=64, epochs=3)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("ensembles", total=4)
        payload = ensembles.run(progress=lambda d: progress.update(task, advance=1, description=d), **kwargs)
    cfg = payload["config"]
    table = Table(title=f"digits MLP 64-{cfg['hidden']}-{cfg['hidden']}-10, sparsity {cfg['sparsity']}, "
                        f"{cfg['tickets']} tickets, {cfg['steps']} steps per run (Adam)")
    for col in ("run", "steps", "median ms / step", "mean ms / step", "total s", "x dense total", "accuracy", "NLL",
                "ECE"):
        table.add_column(col, justify="right")
    dense_total = payload["dense"]["total_s"]
    for name in ("dense", "edst", "dst_ensemble"):
        r = payload[name]
        m = r if name == "dense" else r["curve"][-1]
        table.add_row(name, str(r["steps"]), f"{r['median_step_ms']:.2f}", f"{r['mean_step_ms']:.2f}",
                      f"{r['total_s']:.2f}", f"{r['total_s'] / dense_total:.2f}", f"{m['accuracy']:.4f}",
                      f"{m['nll']:.4f}", f"{m['ece']:.4f}")
    console.print(table)
    curve = Table(title="ensemble of the first k tickets")
    for col in ("k", "EDST acc", "EDST NLL", "EDST ECE", "DST acc", "DST NLL", "DST ECE"):
        curve.add_column(col, justify="right")
    for e, d in zip(payload["edst"]["curve"], payload["dst_ensemble"]["curve"]):
        curve.add_row(str(e["tickets"]), f"{e['accuracy']:.4f}", f"{e['nll']:.4f}", f"{e['ece']:.4f}",
                      f"{d['accuracy']:.4f}", f"{d['nll']:.4f}", f"{d['ece']:.4f}")
    console.print(curve)
    c = payload["cram"]
    console.print(f"CrAM+ step vs its base SGD step (median): {c['cram']['median_step_ms']:.2f} ms vs "
                  f"{c['sgd']['median_step_ms']:.2f} ms = {c['step_cost_vs_base']:.2f}x")
    out = args.out or harness.result_path("ensembles", "cpu")
    payload = {"benchmark": "ensembles", "machine": harness.machine_info("cpu"), **payload}
    path = harness.write_json(out, payload)
    console.print(f"results: {path}")
    if not args.no_plot:
        console.print(f"plot: {ensembles.plot(payload, path[:-5] + '.png')}")
    return 0


def _print_roofline(console, results) -> None:
    """The forward's gather roofline per case with a forward target (bench/roofline.py)."""
    from rich.table import Table

    rows = [r for r in results if r.get("limits", {}).get("needed_ns_per_gather")]
    if not rows:
        return
    t = Table(title="forward gather roofline: ns per gathered panel row (one per non-zero per panel)")
    for col in ("B", "in", "out", "sparsity", "gathers M", "GB gathered", "GB/s", "ours ns", "marginal ns",
                "L1-resident ns", "needed ns", "ceiling no fixed cost", "ceiling if L1"):
        t.add_column(col, justify="right")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lim = r["limits"]
        t.add_row(str(r["batch"]), str(r["in_features"]), str(r["out_features"]), f"{r['sparsity']:.2f}",
                  f"{lim['gathers'] / 1e6:.1f}", f"{lim['gathered_gb']:.2f}", f"{lim['gather_gb_per_s']:.0f}",
                  f"{lim['ns_per_gather']:.3f}", fmt(lim.get("marginal_ns_per_gather"), ".3f"),
                  fmt(lim["l1_ns_per_gather"], ".3f"), f"{lim['needed_ns_per_gather']['fwd_vs_dense']:.3f}",
                  fmt(lim.get("ceiling_at_marginal"), ".1f") + "x" * (lim.get("ceiling_at_marginal") is not None),
                  fmt(lim["ceiling_if_l1"], ".1f") + "x" * (lim["ceiling_if_l1"] is not None))
    console.print(t)


def _cmd_bench(args) -> int:
    if args.scenario == "training":
        return _cmd_bench_training(args)
    if args.scenario == "ensembles":
        return _cmd_bench_ensembles(args)
    if args.scenario == "phases":
        return _cmd_bench_phases(args)
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .bench import csr_linear, harness

    shapes = args.shapes or (csr_linear.QUICK_SHAPES if args.quick else csr_linear.SHAPES)
    sparsities = args.sparsities or (csr_linear.QUICK_SPARSITIES if args.quick else csr_linear.SPARSITIES)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
    # The table has 13 columns: keep it readable when stdout is a pipe or a log file.
    console = Console(width=None if sys.stdout.isatty() else 180)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("csr linear", total=len(shapes) * len(sparsities))
        payload = csr_linear.run(shapes, sparsities, rounds=rounds, torch_sparse=not args.no_torch_sparse,
                                 progress=lambda desc: progress.update(task, advance=1, description=desc))

    console.print(f"machine: {harness.describe_cpu(payload['machine'])}, {payload['machine']['threads']} threads")
    table = Table(title=f"CSR linear, fp32, {payload['machine']['threads']} threads "
                        f"({payload['machine']['cpu_kind']}); ratios are medians of per-round speed-ups")
    for col in ("B", "in", "out", "sparsity", "dense fwd ms", "ours fwd ms", "fwd x dense", "torch.sparse fwd ms",
                "fwd x torch.sparse", "dense step ms", "ours step ms", "step x dense", "ours GFLOP/s", "fwd ran"):
        table.add_column(col, justify="right")
    for r in payload["results"]:
        ms, sp = r["ms"], r["speedup"]
        table.add_row(str(r["batch"]), str(r["in_features"]), str(r["out_features"]), f"{r['sparsity']:.2f}",
                      f"{ms['dense_fwd']:.2f}", f"{ms['ours_fwd']:.2f}", f"{sp['fwd_vs_dense']:.2f}",
                      f"{ms.get('torch_sparse_fwd', float('nan')):.2f}", f"{sp.get('fwd_vs_torch_sparse', float('nan')):.2f}",
                      f"{ms['dense_step']:.2f}", f"{ms['ours_step']:.2f}", f"{sp['step_vs_dense']:.2f}",
                      f"{r['gflops']['ours_fwd']:.1f}", r.get("fwd_backend", ""))
    console.print(table)
    if payload.get("sparse24"):
        t24 = Table(title="2:4 (50%), fp32, our kernels on the compressed form vs dense: forward and layer step")
        for col in ("B", "in", "out", "dense ms", "2:4 ms", "x dense", "auto ran", "ns per kept weight x panel",
                    "FMA rate / dense's", "loop ceiling x dense", "dense step ms", "2:4 step ms", "step x dense",
                    "dx / dW ran"):
            t24.add_column(col, justify="right")
        for r in payload["sparse24"]:
            lim = r.get("limits") or {}
            ms, bwd = r["ms"], r.get("bwd_choice", {})
            t24.add_row(str(r["batch"]), str(r["in_features"]), str(r["out_features"]), f"{ms['dense_fwd']:.2f}",
                        f"{ms['sparse24_fwd']:.2f}", f"{r['fwd_vs_dense']:.2f}", r.get("auto_choice", ""),
                        "-" if not lim else f"{lim['ns_per_gather']:.3f}",
                        "-" if not lim else f"{lim['fma_rate_vs_dense']:.2f}",
                        "-" if "loop_ceiling_vs_dense" not in lim else f"{lim['loop_ceiling_vs_dense']:.2f}",
                        f"{ms.get('dense_step', float('nan')):.2f}", f"{ms.get('sparse24_step', float('nan')):.2f}",
                        f"{r.get('step_vs_dense', float('nan')):.2f}",
                        f"{bwd.get('sparse24_mm_t', '-')} / {bwd.get('sparse24_sddmm', '-')}")
        console.print(t24)
    if payload.get("bf16"):
        tb = Table(title="bf16 forward: the CPU's dense GEMM vs our kernel vs measured auto (what layers run)")
        for col in ("B", "in", "out", "sparsity", "dense ms", "kernel ms", "auto ms", "auto chose", "kernel x dense",
                    "auto x dense"):
            tb.add_column(col, justify="right")
        for r in payload["bf16"]:
            ms, vs = r["ms"], r["vs_dense"]
            tb.add_row(str(r["batch"]), str(r["in_features"]), str(r["out_features"]), f"{r['sparsity']:.2f}",
                       f"{ms['dense_fwd']:.2f}", f"{ms.get('kernel_fwd', float('nan')):.2f}", f"{ms['auto_fwd']:.2f}",
                       r["auto_choice"], f"{vs.get('kernel', float('nan')):.2f}", f"{vs['auto']:.2f}")
        console.print(tb)
    if payload.get("bf16_step"):
        ts = Table(title="bf16 layer step (forward + both gradients) vs nn.Linear in bf16, and what auto ran")
        for col in ("B", "in", "out", "weight", "dense ms", "sparse ms", "x dense", "fwd / dx / dW ran"):
            ts.add_column(col, justify="right")
        for r in payload["bf16_step"]:
            ch = r["auto_choice"]
            ts.add_row(str(r["batch"]), str(r["in_features"]), str(r["out_features"]), r["format"],
                       f"{r['ms']['dense_step']:.2f}", f"{r['ms']['sparse_step']:.2f}", f"{r['step_vs_dense']:.2f}",
                       f"{ch['fwd']} / {ch['dx']} / {ch['dW']}")
        console.print(ts)
    if payload.get("decode"):
        td = Table(title="decode-sized batches: layer forward (Python's per-call cost included)")
        for col in ("dtype", "B", "in", "out", "dense ms", "90% CSR ms", "2:4 ms", "90% x dense", "2:4 x dense"):
            td.add_column(col, justify="right")
        for r in payload["decode"]:
            ms, vs = r["ms"], r["vs_dense"]
            td.add_row(r["dtype"], str(r["batch"]), str(r["in_features"]), str(r["out_features"]),
                       f"{ms['dense_fwd']:.3f}", f"{ms['csr90_fwd']:.3f}", f"{ms['sparse24_fwd']:.3f}",
                       f"{vs['csr90']:.2f}", f"{vs['sparse24']:.2f}")
        console.print(td)
    if payload["targets"]:
        tt = Table(title="targets (this run)")
        for col in ("target", "reached", "goal", ""):
            tt.add_column(col)
        for t in payload["targets"]:
            tt.add_row(t["target"], f"{t['value']:.2f}x", f">= {t['goal']}x", "met" if t["met"] else "MISSED")
        console.print(tt)
    _print_roofline(console, payload["results"])
    path = harness.write_json(args.out or csr_linear.default_path(), payload)
    console.print(f"results: {path}")
    if not args.no_plot:
        try:
            png = csr_linear.plot(payload, path[:-5] + ".png")
            console.print(f"plot: {png}")
        except ImportError:
            console.print("plot skipped (matplotlib is not installed)")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    kwargs = {"epochs": args.epochs, "timing_steps": args.timing_steps, "timing_hidden": args.timing_hidden,
              "sparsity": args.sparsity, "seed": args.seed, "out_dir": args.out_dir}
    if args.methods:
        kwargs["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.quick:
        kwargs.update(epochs=5, timing_steps=5, timing_hidden=1024)
    run(**kwargs)
    return 0


def _cmd_spdy(args) -> int:
    import torch

    from .spdy.demo import run

    if args.threads:
        torch.set_num_threads(args.threads)
    text = args.levels.strip()
    try:
        levels = [float(v) for v in text.split(",")] if ("," in text or "." in text) else int(text)
    except ValueError:
        print(f"sparsekernels spdy: --levels must be a count (e.g. 40) or comma-separated sparsities, got {text!r}",
              file=sys.stderr)
        return 2
    try:
        out = run(args.model, target_speedup=args.target_speedup, levels=levels, method=args.method,
                  search_steps=args.search_steps, repeats=args.repeats, seed=args.seed, width=args.width,
                  batch=args.batch, out_dir=args.out, make_plot=not args.no_plot, progress=not args.no_progress)
    except ValueError as exc:  # a target beyond reach, bad levels: the message says what to change
        print(f"sparsekernels spdy: {exc}", file=sys.stderr)
        return 2
    print(out["description"])
    print(out["result"].table())
    print("(measured: end-to-end forward, dense vs pruned model, interleaved rounds in this process)")
    print(f"results: {out['json']}")
    if out["png"]:
        print(f"plot: {out['png']}")
    elif not args.no_plot:
        print("plot skipped (matplotlib is not installed)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="compiled kernels, backends and the choice per device")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_info.set_defaults(func=_cmd_info)

    p_bench = sub.add_parser("bench", help="time the CSR kernels against dense and torch.sparse")
    p_bench.add_argument("--scenario", choices=("csr", "training", "ensembles", "phases"), default="csr",
                         help="csr: the CSR linear layer (default); "
                              "ensembles: EDST vs one dense run vs a DST ensemble on digits; training: per-step time of a 4096-wide MLP; "
                              "phases: AC/DC compressed / decompressed step and phase-switch time vs dense")
    p_bench.add_argument("--quick", action="store_true", help="a small, fast run (~1 min)")
    p_bench.add_argument("--hidden", type=_positive_int_arg, default=4096, help="training scenario: hidden width")
    p_bench.add_argument("--steps", type=_positive_int_arg, default=20, help="training scenario: timed steps per method")
    p_bench.add_argument("--sparsity", type=_sparsity_arg, default=0.9, help="training scenario: sparsity")
    p_bench.add_argument("--shapes", type=_shapes_arg, help='"B,in,out;B,in,out" (default: the four issue shapes and an 11008 -> 4096 layer)')
    p_bench.add_argument("--sparsities", type=_sparsities_arg, help='comma separated, e.g. "0.9,0.95"')
    p_bench.add_argument("--rounds", type=_positive_int_arg, help="timed rounds per case (default 7, quick 3)")
    p_bench.add_argument("--out", help="JSON path (default bench/results/csr-linear-cpu-<CPU kind>-<time>.json)")
    p_bench.add_argument("--no-plot", action="store_true", help="skip the PNG next to the JSON")
    p_bench.add_argument("--no-torch-sparse", action="store_true", help="skip the torch.sparse.mm baseline")
    p_bench.set_defaults(func=_cmd_bench)

    p_demo = sub.add_parser("demo", help="train an MLP dense vs RigL / SET / static at 90%% sparsity")
    p_demo.add_argument("--epochs", type=_positive_int_arg, default=30, help="digits epochs (default 30)")
    p_demo.add_argument("--timing-steps", type=_positive_int_arg, default=20, help="timed steps of the speed part")
    p_demo.add_argument("--timing-hidden", type=_positive_int_arg, default=4096, help="hidden width of the speed part")
    p_demo.add_argument("--sparsity", type=_sparsity_arg, default=0.9)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument("--methods", default=None,
                        help="digits rows, comma-separated (default dense,rigl,set,static,masked_rigl; also acdc, "
                             "gap, imp: IMP with rewinding, plotted to demo-imp.png)")
    p_demo.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    p_demo.add_argument("--out-dir", default=os.path.join("bench", "results"), help="where demo.png goes")
    p_demo.set_defaults(func=_cmd_demo)

    p_spdy = sub.add_parser("spdy", help="SPDY: per-layer sparsities for a target speed-up, from our kernels' timings")
    p_spdy.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="mlp: 4096-wide, 4 Linear layers, batch 256 (default); cnn: small CNN, batch 64")
    p_spdy.add_argument("--target-speedup", type=float, default=None, help="default: mlp 2.0, cnn 1.3")
    p_spdy.add_argument("--levels", default="40",
                        help="number of sparsity levels (0 to 0.99, default 40) or comma-separated sparsities")
    p_spdy.add_argument("--method", choices=("magnitude", "sparsegpt"), default="magnitude",
                        help="pruner of the search and the applied plan (default magnitude: SparseGPT takes ~8 s "
                             "per layer and level at 4096 wide on one core; the demo weights are random)")
    p_spdy.add_argument("--search-steps", type=_positive_int_arg, default=30, help="candidates the search scores (default 30)")
    p_spdy.add_argument("--repeats", type=_positive_int_arg, default=5, help="timed rounds per measurement (default 5)")
    p_spdy.add_argument("--width", type=_positive_int_arg, default=None, help="mlp: width (default 4096); cnn: channels (64)")
    p_spdy.add_argument("--batch", type=_positive_int_arg, default=None, help="default: mlp 256, cnn 64")
    p_spdy.add_argument("--threads", type=_positive_int_arg, default=None, help="torch threads (default: torch's choice)")
    p_spdy.add_argument("--seed", type=int, default=0)
    p_spdy.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the JSON and PNG")
    p_spdy.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p_spdy.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_spdy.set_defaults(func=_cmd_spdy)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
