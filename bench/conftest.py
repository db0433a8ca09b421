"""pytest-benchmark suite: `make bench-pytest` (or `pytest bench --benchmark-only`).

Each case is a benchmark group holding the dense baseline and our kernel, so the
standard table shows them side by side; the summary below prints speed-up ratios
(dense median / ours median) per group.
"""

import collections


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    groups = collections.defaultdict(dict)
    for bench in session.benchmarks:
        variant = bench.name.split("[")[0].replace("test_", "")
        groups[bench.group][variant] = bench.stats.median
    terminalreporter.section("speed-up vs dense (ratio of medians)")
    for group, stats in sorted(groups.items()):
        parts = []
        for kind in ("fwd", "step", "fwd_24"):
            dense, ours = stats.get(f"dense_{kind}"), stats.get(f"ours_{kind}")
            if dense and ours:
                parts.append(f"{kind} {dense / ours:.2f}x")
        if stats.get("dense_grad_topk") and stats.get("ours_topk_grow"):
            parts.append(f"topk_grow {stats['dense_grad_topk'] / stats['ours_topk_grow']:.2f}x")
        terminalreporter.write_line(f"{group}: " + ", ".join(parts))
