"""What a CPU-bound job costs a GGUF replica's decode at the jobs' OS priority (``jobs.nice``).

    .venv/bin/python bench/job_priority.py [--rounds 2] [--hogs 2]

SmolLM2 decoding in process (llama-cpp-python, the settings of bench/serve_concurrency.py: 2 threads,
repacking off): generation tokens/s alone, then beside ``--hogs`` CPU-bound processes (a job's threads) at
nice 0, 10 and 19. llama.cpp's threads meet at a barrier after every operation, so a process that takes a
core from one of them stalls the whole step: the figure at nice 0 is far below a fair share.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_concurrency as sc

BUSY = "while True: sum(range(10000))"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the decode")
    ap.add_argument("--streams", type=int, default=2, help="streams measured per setting and round")
    args = ap.parse_args()
    run = sc.in_process(sc.Settings(2, 4096, 512, 8, 96, 1234, False))
    run(sc.prompt("w", -1))  # warm-up
    settings: list[tuple[str, int | None]] = [("alone", None), *((f"nice {n}", n) for n in (0, 10, 19))]
    seen: dict[str, list[float]] = {label: [] for label, _ in settings}
    for r in range(args.rounds):
        for label, nice in settings:
            hogs = [
                subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", BUSY])
                for _ in range(args.hogs if nice is not None else 0)
            ]
            time.sleep(0.5)
            try:
                seen[label] += [run(sc.prompt(f"n{r}{label}", i)).decode_tps for i in range(args.streams)]
            finally:
                for p in hogs:
                    p.kill()
                    p.wait()
            last = statistics.median(seen[label][-args.streams :])
            print(f"round {r + 1} {label}: {last:.1f} t/s", flush=True)
    print(f"\ndecode tokens/s beside {args.hogs} CPU-bound processes (median, range):")
    for label, values in seen.items():
        print(f"  {label:8} {statistics.median(values):6.1f}  ({min(values):.1f} to {max(values):.1f})")


if __name__ == "__main__":
    main()
