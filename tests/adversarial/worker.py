"""Run reader calls on crafted files in forked children; report their time and peak memory.

Started once per test session (``conftest.py``): it imports ``jaxopt_nn``
and warms up the code paths, then serves one JSON request per stdin line,
``{"action": ..., "path": ..., "args": [...]}``. Each request runs in a
child forked from this warm process, under an address-space limit and an
alarm, with every warning raised as an error; the reply (one JSON line on
stdout) holds the outcome, the child's CPU seconds, wall seconds and peak
resident memory (``ru_maxrss`` from ``wait4``). A ``noop`` request measures
the bare baseline that the tests subtract.
"""

import contextlib
import io
import json
import os
import resource
import signal
import sys
import time
import traceback
import warnings

import numpy as np

from jaxopt_nn import archive, cli, data

HEADROOM = 4 << 30  # address space a child may add: a runaway allocation fails, not the machine
ALARM_S = 60  # a child still running after this is killed


def _summary(tree) -> dict:
    leaves = [x for x in _leaves(tree)]
    return {
        "leaves": len(leaves),
        "nbytes": int(sum(x.nbytes for x in leaves)),
        "sum": float(sum(float(np.sum(x, dtype=np.float64)) for x in leaves)),
    }


def _leaves(node):
    if isinstance(node, np.ndarray):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for value in node:
            yield from _leaves(value)


def _act(action: str, path: str, args: list) -> dict:
    if action == "noop":
        return {}
    if action == "load":
        return _summary(archive.load(path))
    if action == "inspect":
        info = archive.inspect(path)
        return {"table": info.table(), "metadata": info.metadata}
    if action == "cli":
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([arg.replace("{path}", path) for arg in args])
        return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}
    if action == "read_idx":
        return {"shape": list(data.read_idx(path).shape)}
    if action == "load_data":
        return {"shape": list(data.load(path).x_train.shape)}
    raise ValueError(f"unknown action {action!r}")


def _child(request: dict, write_fd: int) -> None:
    signal.alarm(ALARM_S)
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    limit = vm * 1024 + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("error")
    try:
        reply = {"ok": True, "result": _act(request["action"], request["path"], request["args"])}
    except Exception as err:  # reported to the test, which checks the type and message
        reply = {
            "ok": False,
            "error": type(err).__name__,
            "value_error": isinstance(err, ValueError),
            "archive_error": isinstance(err, archive.ArchiveError),
            "message": str(err),
            "traceback": traceback.format_exc(),
        }
    with os.fdopen(write_fd, "w") as pipe:
        json.dump(reply, pipe)


def run(request: dict) -> dict:
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _child(request, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        text = pipe.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    reply = json.loads(text) if text else {"ok": False, "error": f"child died ({status})"}
    reply.update(
        cpu_s=usage.ru_utime + usage.ru_stime, wall_s=wall, maxrss_mib=usage.ru_maxrss / 1024
    )
    return reply


def _warm_up() -> None:
    """Run the code paths once here, so that the children measure the reading, not imports."""
    blob = archive.dumps({"w": np.eye(3, dtype=np.float32), "b": [None, {}]}, metadata={"m": 1})
    archive.inspect(archive.dumps(archive.loads(blob))).table()
    with contextlib.redirect_stderr(io.StringIO()):
        cli.main(["inspect", "/nonexistent.jnz"])


def main() -> None:
    warnings.simplefilter("ignore")  # fork() warns about threads; children run no JAX code
    _warm_up()
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
