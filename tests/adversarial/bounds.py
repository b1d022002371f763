"""Bounds on reading a crafted file, and the client of the warm worker (``worker.py``)."""

import json
import os
import re
import subprocess
import sys
import uuid

CPU_LIMIT_S = 2.0  # CPU seconds a child may spend on one crafted file
MEMORY_LIMIT_MIB = 300.0  # peak resident memory above a bare forked child


class Bounded:
    """``run(action, data, *args)``: the worker's reply, with ``extra_mib`` over the baseline."""

    def __init__(self, directory):
        self.directory = directory
        worker = os.path.join(os.path.dirname(__file__), "worker.py")
        self.process = subprocess.Popen(
            [sys.executable, worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        self.baseline_mib = self._ask("noop", "", [])["maxrss_mib"]

    def _ask(self, action, path, args):
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"action": action, "path": path, "args": args}) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        reply["extra_mib"] = reply["maxrss_mib"] - getattr(self, "baseline_mib", 0.0)
        return reply

    def run(self, action, data, *args, suffix=".jnz"):
        """Write ``data`` (bytes) to a file, or use ``data`` as a path, and run ``action`` on it."""
        if isinstance(data, bytes):
            path = os.path.join(self.directory, f"{uuid.uuid4().hex}{suffix}")
            with open(path, "wb") as file:
                file.write(data)
        else:
            path = str(data)
        return self._ask(action, path, list(args))

    def close(self):
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)
        self.process.stdout.close()


def assert_cheap(reply):
    """The child stayed within the CPU and memory bounds (and did not crash)."""
    assert "error" not in reply or "child died" not in reply["error"], reply
    assert reply["cpu_s"] < CPU_LIMIT_S, f"{reply['cpu_s']:.2f} CPU s: {reply}"
    assert reply["extra_mib"] < MEMORY_LIMIT_MIB, f"{reply['extra_mib']:.0f} MiB: {reply}"


def assert_refused(reply, match, *, archive_error=True):
    """Refused cheaply with a ValueError (an ArchiveError for archives) whose message matches."""
    assert_cheap(reply)
    assert not reply["ok"], f"expected a refusal matching {match!r}; got {reply}"
    assert reply["value_error"], reply.get("traceback")
    if archive_error:
        assert reply["archive_error"], reply.get("traceback")
    assert re.search(match, reply["message"]), (match, reply["message"])
