"""A 50 MB text file ingests in bounded memory: ``bench/ingest_memory.py`` run in a fresh process.

The bound, 400 MiB of peak RSS growth up to the last chunk written: the pipeline holds one segment
(about 1 MB) at a time, whose cleaning and tokenising cost about 100 MiB, plus a record of a few hundred
bytes per chunk, and LanceDB's own buffers (about 150 MiB once it writes); measured at about 180-270
MiB. Reading the file whole costs far more: its bytes and its text are 100 MB before any work, cleaning
it whole is about 50 bytes per character (2.4 GiB), and the pipeline before segments grew by 6.5 GiB
on this file. The vector store's index rebuild that follows reads the whole dataset (it grows with the
dataset, not with one file), so the whole run gets a looser bound, still a third of the old growth.

Long words and large chunks keep the run near 30 s on two cores: fewer tokens for the store to index;
the pipeline's memory per byte does not depend on them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

WRITTEN_BOUND_MIB = 400
WHOLE_RUN_BOUND_MIB = 2048


def repo_root() -> Path:
    here = Path(__file__).resolve()
    return next(p for p in here.parents if (p / "pyproject.toml").exists())


def test_a_50_mb_text_file_ingests_in_bounded_memory() -> None:
    bench = repo_root() / "bench" / "ingest_memory.py"
    args = ["--mb", "50", "--long-words", "--chunk-size", "512", "--overlap", "0", "--json"]
    done = subprocess.run(
        [sys.executable, str(bench), *args], capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["chunks"] > 5000  # it did ingest the whole file
    assert 0 < result["written_growth_mib"] < WRITTEN_BOUND_MIB, result
    assert result["growth_mib"] < WHOLE_RUN_BOUND_MIB, result
