"""One job's process on this machine: started in its own session with its output appended to the job's
log, polled, and stopped as a replica is (SIGTERM to its process group, SIGKILL after a grace period).

It is not a replica (no port, no health check, no secret), so it does not go through the replica backend;
it dies with the scheduler's process as replicas do (``_job_main`` asks for ``PR_SET_PDEATHSIG``), which
is why it must be started from a long-lived thread (the event loop's).
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lamina.orchestration._procs import signal_group, tail_lines

#: bytes read from the end of a log to find its last lines


@dataclass(frozen=True)
class JobProcess:
    job_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(cls, job_id: str, argv: list[str], log_path: Path) -> JobProcess:
        """Start ``argv``; raises OSError when it cannot be (missing executable, unwritable log)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"--- lamina {stamp}: starting {job_id}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(job_id, process, log_path)

    def poll(self) -> int | None:
        """The exit code once the process has exited (negative: killed by that signal), else None."""
        return self.process.poll()

    def stop(self, grace_s: float) -> int:
        """SIGTERM the job's process group, wait up to ``grace_s``, then SIGKILL it; its exit code.
        Blocks (call it from a thread in async code); never raises for a process already gone."""
        if self.process.poll() is not None:
            return self.process.returncode
        self._signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.process.wait()

    def _signal(self, sig: signal.Signals) -> None:
        signal_group(self.process, sig)

    def tail_log(self, lines: int) -> str:
        """The last ``lines`` lines of the job's log ('' if there is none)."""
        return tail_lines(self.log_path, lines)
