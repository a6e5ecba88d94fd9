"""Helpers of the Beam conversion tests: the CLI in a fresh process, its worker processes, and
whole-dataset comparison.

The CLI runs with the test's temporary folder as its working directory and without PYTHONPATH, so
its Beam workers (processes of their own) import the installed package, never the repository
they happen to sit in.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import signal
import subprocess
import sys
import time

BEAM_ENV_DROP = ("PYTHONPATH",)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in BEAM_ENV_DROP}
    env.update(extra)
    return env


@dataclasses.dataclass
class Cli:
    """A CLI run in a process of its own, its stdout and stderr going to files (a pipe nobody reads
    while waiting could fill and stall the run)."""

    process: subprocess.Popen
    stdout: pathlib.Path
    stderr: pathlib.Path

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        """Waits for the run (then kills what is left of it) and gives its output."""
        try:
            self.process.wait(timeout=timeout)
        finally:
            kill_tree(self.process.pid)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, self.stdout.read_text(),
                                           self.stderr.read_text())


def start_cli(args: list[str], cwd: pathlib.Path, **env: str) -> Cli:
    """The CLI started in `cwd`, its output to files there (cli-N.stdout, cli-N.stderr)."""
    number = next(i for i in itertools.count() if not (cwd / f"cli-{i}.stdout").exists())
    stdout, stderr = cwd / f"cli-{number}.stdout", cwd / f"cli-{number}.stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "data_pipelines.convert", *args], cwd=cwd,
                                   env=cli_env(**env), stdout=out, stderr=err, text=True)
    return Cli(process, stdout, stderr)


def run_cli(args: list[str], cwd: pathlib.Path, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return start_cli(args, cwd, **env).finish(timeout)


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def cmdline(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def beam_workers(pid: int) -> list[int]:
    """The Beam SDK worker processes a CLI run started."""
    return [p for p in descendants(pid) if "sdk_worker_main" in cmdline(p) and not cmdline(p).startswith("/bin/sh")]


def kill_tree(pid: int) -> None:
    """Kills what a test started: the process and everything below it (Beam's local worker processes)."""
    for p in [*descendants(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.02)


def dataset_files(directory: pathlib.Path) -> dict[str, bytes]:
    """Every file of a converted dataset by name, but for a killed write's temporary (`.*.tmp`,
    which nothing reads)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.name.endswith(".tmp")}
