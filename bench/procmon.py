"""Child processes measured from outside: exit time, peak RSS, timestamped log lines.

Linux only (``/proc``). Peak RSS comes from two sources:

* ``VmHWM`` in ``/proc/PID/status``, polled every ``POLL_SECONDS`` while the child runs.
  Exact for the child's own address space, but growth in the last poll interval before
  exit can be missed.
* ``ru_maxrss`` from ``wait4``: exact at exit, but the kernel folds in the address space
  the child had *before* ``exec``, which for a ``vfork``-ed child is the parent's. So it
  is only trusted when it exceeds this (deliberately lean) parent's own ``VmHWM``.

The child is awaited with ``waitid(WNOWAIT)`` first, so its pid cannot be reused while
the poller might still read ``/proc/PID``; only then is it reaped with ``wait4``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

POLL_SECONDS = 0.02
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def status_fields(pid: int | str, *fields: str) -> dict[str, int]:
    """Numeric fields of /proc/PID/status (``kB`` ones in KiB); absent ones left out."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in fields:
                    found[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return found


def status_kib(pid: int | str, field: str) -> int | None:
    """A ``kB`` field of /proc/PID/status, or None when absent (zombie, gone)."""
    return status_fields(pid, field).get(field)


def loopback_bytes() -> int:
    """Bytes sent on ``lo`` so far (every loopback user counts, not only ours)."""
    with open("/proc/net/dev") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    return 0


def cpu_busy_seconds() -> float:
    """CPU seconds spent busy on the whole machine so far, every core summed."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def process_cpu_seconds(pid: int | str) -> float:
    """utime + stime of a live process (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_for_quiet(max_wait: float, threshold_cores: float = 0.15) -> float:
    """Wait until the machine is idle for one second (other users' jobs skew timings).

    Returns the busy cores measured in the last second (our own process excluded).
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy0, own0 = cpu_busy_seconds(), process_cpu_seconds("self")
        time.sleep(1.0)
        busy = cpu_busy_seconds() - busy0 - (process_cpu_seconds("self") - own0)
        if busy < threshold_cores or time.monotonic() >= deadline:
            return busy


class Child:
    """One monitored child process."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
        stdout_path: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.parent_hwm_kib = status_kib("self", "VmHWM") or 0
        self.stdout_lines: list[tuple[float, str]] = []
        self.stderr_lines: list[tuple[float, str]] = []
        self.ended: float | None = None
        self.returncode: int | None = None
        self.ru_maxrss_kib = 0
        self.cpu_seconds = 0.0  # user + system, from wait4
        self.vmhwm_kib = 0
        #: Most threads seen at once (polled): what ``sgx.max_threads`` must allow.
        self.peak_threads = 0
        #: (monotonic time, VmRSS KiB) samples: when the memory is used, not only how much.
        self.rss_samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._exited = False  # under _lock: once set, /proc/PID is not read again
        self._reaped = threading.Event()
        self._stdout_cond = threading.Condition()
        self.started = time.monotonic()
        # A client's stdout (a text job prints every matching item) goes straight to a
        # file: read line by line here, 5M lines cost this process, and so the job's wall,
        # seconds that are not teepsi's.
        stdout = stdout_path.open("wb") if stdout_path is not None else subprocess.PIPE
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        if stdout_path is not None:
            stdout.close()  # the child has its own copy
        self.pid = self.popen.pid
        assert self.popen.stderr is not None
        readers = [(self.popen.stderr, False)]
        if self.popen.stdout is not None:
            readers.append((self.popen.stdout, True))
        self._threads = [
            *(threading.Thread(target=self._read, args=r, daemon=True) for r in readers),
            threading.Thread(target=self._wait, daemon=True),
            threading.Thread(target=self._poll, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # -- threads -------------------------------------------------------------------

    def _read(self, stream: IO[bytes], is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            # Timestamp on arrival: the children's log format carries no time.
            entry = (time.monotonic(), raw.decode(errors="replace").rstrip("\n"))
            if is_stdout:
                with self._stdout_cond:
                    self.stdout_lines.append(entry)
                    self._stdout_cond.notify_all()
            else:
                self.stderr_lines.append(entry)
        stream.close()
        if is_stdout:
            with self._stdout_cond:
                self._stdout_cond.notify_all()

    def _wait(self) -> None:
        os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        ended = time.monotonic()
        with self._lock:
            self._exited = True
        _, status, usage = os.wait4(self.pid, 0)
        self.ended = ended
        self.ru_maxrss_kib = int(usage.ru_maxrss)
        self.cpu_seconds = usage.ru_utime + usage.ru_stime
        self.returncode = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.returncode  # so Popen never waits on a reaped pid
        self._reaped.set()

    def _poll(self) -> None:
        while not self._reaped.is_set():
            with self._lock:
                if self._exited:
                    return
                status = status_fields(self.pid, "VmHWM", "VmRSS", "Threads")
            hwm, rss = status.get("VmHWM"), status.get("VmRSS")
            self.peak_threads = max(self.peak_threads, status.get("Threads", 0))
            if hwm is not None and hwm > self.vmhwm_kib:
                self.vmhwm_kib = hwm
            if rss is not None:
                self.rss_samples.append((time.monotonic(), rss))
            self._reaped.wait(POLL_SECONDS)

    # -- control -------------------------------------------------------------------

    def read_hwm_now(self) -> int:
        """Refresh VmHWM from the live process (exact while it still runs)."""
        with self._lock:
            if not self._exited:
                hwm = status_kib(self.pid, "VmHWM")
                if hwm is not None and hwm > self.vmhwm_kib:
                    self.vmhwm_kib = hwm
        return self.vmhwm_kib

    def rss_kib(self) -> int | None:
        with self._lock:
            return None if self._exited else status_kib(self.pid, "VmRSS")

    def cpu_now(self) -> float:
        """CPU seconds so far, while it runs; after exit, the total from wait4."""
        with self._lock:
            if not self._exited:
                return process_cpu_seconds(self.pid)
        self._reaped.wait(10)
        return self.cpu_seconds

    def signal(self, signum: int) -> None:
        with self._lock:
            if not self._exited:
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def wait(self, timeout: float) -> bool:
        return self._reaped.wait(max(0.0, timeout))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        if not self.wait(timeout):
            self.kill()
            self.wait(10.0)

    def first_stdout_line(self, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self._stdout_cond:
            while not self.stdout_lines:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._reaped.is_set():
                    return None
                self._stdout_cond.wait(min(remaining, 0.5))
            return self.stdout_lines[0][1]

    def finish(self) -> None:
        """After exit: let the readers drain, then write the log file."""
        for thread in self._threads[:2]:
            thread.join(timeout=10)
        with open(self.log_path, "w") as handle:
            handle.write("$ " + " ".join(self.argv) + "\n")
            for when, line in sorted(self.stderr_lines + self.stdout_lines):
                handle.write(f"[{when - self.started:9.3f}] {line}\n")

    # -- results -------------------------------------------------------------------

    @property
    def wall(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def peak_rss_kib(self) -> int:
        if self.ru_maxrss_kib > self.parent_hwm_kib:
            return max(self.ru_maxrss_kib, self.vmhwm_kib)
        return self.vmhwm_kib  # ru_maxrss may be ours, inherited through vfork

    def stderr_text(self) -> str:
        return "\n".join(line for _, line in self.stderr_lines)
