"""One line per bench_manager_step.py JSON (its first row, piecewise mode, else eager): manager vs kernels
per step, the overhead, host time, evictions deferred, steady calls and the slowest layer calls;
then the --phases table if the run had one.

    python3 bench/decode/summarize_step.py bench/results/manager-step-*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    for path in paths:
        row = json.loads(Path(path).read_text())["rows"][0]
        p = row["piecewise" if "piecewise" in row else "eager"]  # eager: --smoke, CPU
        slow = p["slowest_layer_call_steps"]
        print(
            f"{path.split('/')[-1]}: batch {row['batch']}, defer {row.get('defer_evictions')}; "
            f"manager {p['manager_ms_mean']:.2f} ms (median {p['manager_ms_median']:.2f}), "
            f"kernels {p['kernels_ms_mean']:.2f} ({p['kernels_ms_median']:.2f}), "
            f"overhead {100 * p['overhead_of_step']:+.1f} %, host {p['manager_host_ms_mean']:.2f} ms, "
            f"slowest step {p['manager_ms_max']:.2f} ms; deferred evictions {row.get('deferred_evictions')}, "
            f"steady appends/attends {row['steady_appends']}/{row['steady_attends']}; "
            f"slowest layer call: median {statistics.median(us for us, _ in slow):.0f} us"
        )
        early = p.get("reencode_ms_in_layers_0_7_steps")
        if (
            early
        ):  # steps whose layers 0-7 overlapped a re-encoder job, against the others
            busy = [
                m for m, e in zip(p["manager_ms_steps"], early, strict=True) if e > 0
            ]
            idle = [
                m for m, e in zip(p["manager_ms_steps"], early, strict=True) if e == 0
            ]
            def mean(ms: list[float]) -> str:
                return f"mean {statistics.fmean(ms):.2f} ms" if ms else "none"

            print(
                f"    re-encoder work in layers 0-7: {len(busy)} steps, {mean(busy)}; "
                f"the other {len(idle)}: {mean(idle)}"
            )
        for phase in row.get("phases", []):
            print(
                f"    {phase['phase']:<48} {phase['calls']:>6} calls {phase['us_per_eviction']:>9.1f} us/eviction"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
