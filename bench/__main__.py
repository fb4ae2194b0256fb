"""`make bench`: run the benchmarks and record their figures in BENCHMARKS.md.

python -m bench            all benchmarks
python -m bench latency    one of them
"""

from __future__ import annotations

import sys

from bench import latency

BENCHES = {"latency": latency.main}


def main() -> None:
    names = sys.argv[1:] or list(BENCHES)
    for name in names:
        print(f"== bench {name}", flush=True)
        BENCHES[name]()


main()
