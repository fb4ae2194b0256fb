"""`make bench`: run the benchmarks and record their figures in BENCHMARKS.md.

python -m bench            all benchmarks
python -m bench latency    one of them (latency, admission, overload, soak, throughput,
                           fairness, fleet, replication, engine, commands,
                           operating-point, batch, before-after)
"""

from __future__ import annotations

import sys

from bench import (
    admission,
    batch,
    before_after,
    commands,
    engine,
    engine_curve,
    fairness,
    fleet,
    latency,
    operating_point,
    overload,
    replication,
    soak,
    throughput,
)

BENCHES = {
    "latency": latency.main,
    "admission": admission.main,
    "overload": overload.main,
    "soak": soak.main,
    "throughput": throughput.main,
    "fairness": fairness.main,
    "fleet": fleet.main,
    "replication": replication.main,
    "engine": engine.main,
    "engine-curve": engine_curve.main,
    "commands": commands.main,
    "operating-point": operating_point.main,
    "batch": batch.main,
    "before-after": before_after.main,
}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        print(f"== bench {name}", flush=True)
        BENCHES[name]()


main()
