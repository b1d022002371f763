"""Train-step time vs number of devices and mesh shape (LeNet-300-100, Adam).

Configurations, all measured in the same run, interleaved round by round:

* ``single``: ``train.make_train_step`` jitted on one device (the baseline);
* ``data=d``: ``parallel.data_parallel_step`` on a ``d x 1`` mesh, ``d`` = 1,
  2, 4, ... devices;
* ``data=a,model=b``: data plus Megatron tensor parallelism (``fc1``
  column-parallel, ``fc2`` row-parallel) on all devices;
* ``pmap``: ``parallel.pmap_train_step`` on all devices.

The global batch is the same for every configuration (strong scaling); the
speedup is ``baseline median / configuration median``.

On a machine without accelerators it simulates ``--cpu-devices`` CPU devices
(default 8) that share the host's cores, so the CPU numbers show overheads,
not speedups. On a GPU/TPU machine it uses the real devices; a larger model
shows the scaling better, e.g.::

    python benchmarks/parallel.py --hidden 4096 4096 --in-features 4096 --batch 8192

Under ``jax.distributed`` (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` set on every host) the same command measures across hosts;
process 0 writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    parser.add_argument("--cpu-devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--in-features", type=int, default=784)
    parser.add_argument("--hidden", type=int, nargs=2, default=(300, 100))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "parallel.json"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 3, 3
    return args


def main(argv: list[str]) -> None:
    args = _parse(argv)
    import jax

    jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # CPU backend only

    import numpy as np
    import optax
    from flax import nnx

    from jaxopt_nn import parallel, train
    from jaxopt_nn.models import LeNet300100

    parallel.initialize()
    n = jax.device_count()
    tx = optax.adam(1e-3)
    model = LeNet300100(args.in_features, hidden=tuple(args.hidden), rngs=nnx.Rngs(0))
    graphdef, state0 = train.init_train_state(model, tx)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch, args.in_features)).astype(np.float32)
    y = rng.integers(0, 10, size=args.batch).astype(np.int32)
    plain = train.make_train_step(graphdef, tx, jit=False)
    rules = parallel.tensor_parallel_rules(column=["fc1"], row=["fc2"])

    def fresh():
        return jax.tree.map(np.asarray, state0)

    configs = {}  # name -> (devices, mesh shape, step, state, batch)
    single = jax.jit(plain, donate_argnums=(0,))
    device0 = jax.local_devices()[0]
    configs["single"] = (
        1,
        "-",
        single,
        jax.device_put(fresh(), device0),
        jax.device_put((x, y), device0),
    )
    d = 1
    while d <= n:
        mesh = parallel.make_mesh(data=d, devices=jax.devices()[:d])
        configs[f"data={d}"] = (
            d,
            f"{d}x1",
            parallel.data_parallel_step(plain, mesh),
            fresh(),
            parallel.global_batch((x, y), mesh),
        )
        d *= 2
    for model_size in (2, 4):
        hidden_ok = all(h % model_size == 0 for h in args.hidden)
        if n % model_size or n == model_size or not hidden_ok:
            continue
        mesh = parallel.make_mesh(model=model_size)
        shardings = parallel.train_state_shardings(fresh(), mesh, rules)
        step = parallel.data_parallel_step(plain, mesh, shardings)
        configs[f"data={n // model_size},model={model_size}"] = (
            n,
            f"{n // model_size}x{model_size}",
            step,
            jax.device_put(fresh(), shardings),
            parallel.global_batch((x, y), mesh),
        )
    if jax.process_count() == 1 and args.batch % n == 0:
        configs["pmap"] = (
            n,
            f"pmap {n}",
            parallel.pmap_train_step(graphdef, tx),
            parallel.replicate(fresh()),
            parallel.split_batch((x, y), n),
        )

    states = {name: c[3] for name, c in configs.items()}
    for name, (_, _, step, _, batch) in configs.items():  # compile and warm up
        for _ in range(2):
            states[name], metrics = step(states[name], *batch)
        jax.block_until_ready(metrics)

    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (_, _, step, _, batch) in configs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                states[name], metrics = step(states[name], *batch)
            jax.block_until_ready((states[name], metrics))
            times[name].append((time.perf_counter() - start) / args.steps)

    base = statistics.median(times["single"])
    rows = []
    for name, (devices, shape, *_) in configs.items():
        med = statistics.median(times[name])
        rows.append(
            {
                "config": name,
                "devices": devices,
                "mesh": shape,
                "median_ms": round(med * 1e3, 3),
                "speedup_vs_single": round(base / med, 3),
            }
        )
    result = {
        "benchmark": "LeNet-300-100 train step (adam), strong scaling",
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": n,
        "process_count": jax.process_count(),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "batch": args.batch,
        "in_features": args.in_features,
        "hidden": list(args.hidden),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
    }
    from jaxopt_nn.tree import format_table

    print(
        format_table(
            ["config", "devices", "mesh", "median ms", "speedup"],
            [
                [
                    r["config"],
                    r["devices"],
                    r["mesh"],
                    f"{r['median_ms']:.2f}",
                    f"{r['speedup_vs_single']:.2f}x",
                ]
                for r in rows
            ],
        )
    )
    if jax.process_index() == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
