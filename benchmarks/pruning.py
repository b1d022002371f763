"""Pruning benchmark: step-time overhead, mask-state bytes, accuracy vs sparsity, BCOO inference.

(a) train-step time of LeNet-300-100 (784 inputs, batch 128; with
    ``--overhead-models resnet`` also ResNet-20 on 8x8 images) with adam vs
    ``prune(..., inner=adam)`` for every method, interleaved, on non-update
    steps (the common case: masks are recomputed every 10 steps or fewer)
    whose mask-update gate is evaluated at run time as in training, and with
    a mask update on every step (magnitude and RigL, bool and bit-packed mask
    state); the bytes each compiled step reads and writes on a non-update
    step (from its HLO); and the bytes of the mask state. With ``--donate``
    (LeNet-300-100) every step, dense included, donates its state as
    ``jaxopt_nn.train``'s step does (``step_overhead_donated``).
(b) test accuracy vs sparsity (80/90/95/98%) on digits, trained from
    scratch, of LeNet-300-100 and ResNet-20, over several seeds (model init,
    batch order and mask key): dense-to-sparse gradual magnitude pruning
    (Zhu & Gupta cubic ramp from 1/8 to 1/2 of training, masks every
    max(2, steps // 40) steps: 10 for LeNet), gradual saliency and STE on
    the same ramp, ``magnitude-erk``: gradual magnitude pruning on the same
    ramp with ERK per-layer sparsities (the layer distribution RigL starts
    from, so small layers are pruned less than with the uniform one),
    sparse from the first step SET and RigL (ERK,
    drop-and-grow as often until 3/4 of training, cosine-decayed update
    fraction 0.3) and static masks (the same
    seed's dense run's magnitude masks on the same initial weights, a one-shot
    lottery ticket). All wrap adam (cosine-decayed learning rate); the
    target sparsity is a traced argument, so one compilation serves every
    sparsity and seed of a method.
(c) dense vs ``to_sparse`` (BCOO) inference time of the LeNet-300-100 kernels.

Run: ``python benchmarks/pruning.py [--quick] [--models lenet resnet]``; the
parts given (``--parts overhead accuracy inference``) are merged into
``benchmarks/results/pruning.json``, so the models can run separately; with
``--methods`` the new runs replace those of the same method, seed and target
in the model's section and the others are kept (the dense runs are only
repeated when ``static`` needs their masks or the section has none).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxopt_nn import data, models, pruning, train

OUT = Path(__file__).parent / "results" / "pruning.json"
METHODS = ("magnitude", "magnitude-erk", "saliency", "ste", "set", "rigl", "static")
NEVER = 10**9  # a step no schedule reaches: every measured step is a non-update step


def _time(fn, repeats, clock=time.perf_counter):
    """Seconds of each of ``repeats`` calls of ``fn()`` on ``clock`` (blocks on the result)."""
    out = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(fn())
        out.append(clock() - start)
    return out


def _make_step(graphdef, make_tx, ste: bool, donate: bool = False):
    """``step(state, x, y, *args)``: adam (+ prune) step, ``make_tx(*args)`` built in the trace.

    With ``ste`` the forward pass sees ``straight_through(params, masks)``; with
    ``donate`` the state's buffers are donated (as ``jaxopt_nn.train``'s step does).
    """

    def step(state, x, y, *args):
        tx = make_tx(*args)

        def objective(params):
            if ste:
                params = pruning.straight_through(params, state.opt_state.masks)
            model = nnx.merge(graphdef, params, state.rest, copy=True)
            model.train()
            loss = train.cross_entropy_loss(model(x), y)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, rest

        (_, rest), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return train.TrainState(optax.apply_updates(state.params, updates), rest, opt_state)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _tx_factory(method: str, lr, steps: int, packed: bool = False, update: int | None = 10):
    """``make_tx(target, masks, key)``: the method's transform at a traced target sparsity.

    With ``steps=NEVER`` (the step-time part) every method is gated at run time
    by ``t % update == 0`` at the target sparsity, so the ``lax.cond`` of the mask
    update is in every compiled step as in training; ``update=None`` never
    recomputes masks after step 0.
    """
    if method == "dense":
        return lambda target, masks, key: optax.adam(lr)
    frequency = NEVER if update is None else update
    # the cubic ramp is linear in its final sparsity: target * ramp(t) / 0.5 ends at target
    ramp = pruning.polynomial_schedule(0.5, steps // 8, steps // 2, frequency=frequency)

    def make_tx(target, masks, key):
        kwargs = {"inner": optax.adam(lr), "packed": packed}
        if method == "static":
            return pruning.prune(None, method="static", masks=masks, **kwargs)
        if method in ("set", "rigl") or steps == NEVER:
            sched = pruning.SparsitySchedule(
                lambda t: target, lambda t: jnp.asarray(t) % frequency == 0, float("nan")
            )
        else:  # the Zhu & Gupta cubic ramp 0 -> target
            sched = pruning.SparsitySchedule(
                lambda t: target * (2 * ramp(t)), ramp.is_update_step, float("nan")
            )
        if method in ("set", "rigl"):
            return pruning.prune(sched, method=method, key=key, update_end=3 * steps // 4, **kwargs)
        if method == "magnitude-erk":  # ERK of the traced ramp sparsity, every mask update
            return pruning.prune(sched, method="magnitude", distribution="erk", **kwargs)
        return pruning.prune(sched, method=method, **kwargs)

    return make_tx


# ------------------------------------------------------------ (a) overhead

_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "u8": 1}
_ARRAY = re.compile(r"\b(f32|s32|u32|pred|u8)\[([\d,]*)\]")
_OP = re.compile(r"\s*(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:, |$)")


def _hlo_bytes(text: str) -> int:
    """Bytes read and written by the compiled step when no branch of a cond is taken.

    Sums operands and results of the ENTRY computation's instructions, with the
    first branch (the false one: no mask update) for each ``conditional``;
    ``cost_analysis()`` would count every branch. A fusion that only slices an
    operand (through element remaps) is counted as reading the slices.
    """
    bodies: dict[str, list[str]] = {}
    name = None
    for line in text.splitlines():
        if line.rstrip().endswith("{") and (head := re.match(r"^(ENTRY )?%(\S+) ", line)):
            name = "ENTRY" if head.group(1) else head.group(2)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            bodies[name].append(line)

    def size(shape: str) -> int:
        dims = (math.prod(int(d) for d in ds.split(",") if d) for _, ds in _ARRAY.findall(shape))
        return sum(_BYTES[t] * n for (t, _), n in zip(_ARRAY.findall(shape), dims, strict=True))

    def cost(body: list[str]) -> int:
        shapes, total = {}, 0
        for line in body:
            if not (op := _OP.match(line)):
                continue
            out, shape, kind, args = op.groups()
            shapes[out] = shape
            if kind == "conditional":
                total += cost(bodies[re.search(r"branch_computations=\{%([^,}]+)", line)[1]])
            elif kind not in ("parameter", "tuple", "get-tuple-element", "constant", "bitcast"):
                names = [a.strip()[1:] for a in args.split(",") if a.strip().startswith("%")]
                fused = re.search(r"calls=%([\w.-]+)", line) if kind == "fusion" else None
                read = [size(shapes.get(a, "")) for a in names]
                if fused:
                    read = [sliced(fused[1], i, n) for i, n in enumerate(read)]
                total += size(shape) + sum(read)
        return total

    parsed: dict[str, list[tuple[str, ...]]] = {}

    def sliced(computation: str, index: int, whole: int) -> int:
        """Bytes a fusion reads of its operand ``index``: only the slices, if it only slices it.

        Inside a loop fusion an element remap (bitcast, copy, transpose,
        reshape) computes only the elements its users ask for.
        """
        if computation not in parsed:  # each fused computation is parsed once
            parsed[computation] = [
                op.groups() for line in bodies[computation] if (op := _OP.match(line))
            ]
        ops = parsed[computation]
        start = next(
            (out for out, _, kind, args in ops if kind == "parameter" and args == str(index)), None
        )
        if start is None:
            return whole
        frontier, read = [start], 0
        while frontier:
            name = frontier.pop()
            for out, shape, kind, args in ops:
                if f"%{name}" not in re.findall(r"%[\w.-]+", args):
                    continue
                if kind in ("bitcast", "copy", "transpose", "reshape"):
                    frontier.append(out)  # element remaps: only the sliced elements are read
                elif kind == "slice":
                    read += size(shape)
                else:
                    return whole
        return read

    return cost(bodies["ENTRY"])


def step_overhead(
    rounds: int, per_round: int, model_name: str = "lenet", donate: bool = False
) -> dict:
    """Median wall and CPU time of each variant's step, and its ratio to the dense step.

    ``model_name``: ``'lenet'`` (LeNet-300-100 on 784 inputs) or ``'resnet'``
    (ResNet-20 on 8x8 digits-sized images), batch 128. ``donate``: every step
    (dense included) donates its state, each call taking the last one's.
    """
    if model_name == "lenet":
        model = models.LeNet300100(784, rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (128, 784))
    else:
        model = _model("resnet", 0)
        x = jax.random.normal(jax.random.key(1), (128, 8, 8, 1))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    graphdef, dense_state = train.init_train_state(model, optax.adam(1e-3))
    ticket = pruning.magnitude_masks(dense_state.params, 0.9)
    key, target = jax.random.key(0), jnp.float32(0.9)
    variants = {"dense": ("dense", False, None)}
    for method in METHODS:
        variants[f"{method} (no mask update)"] = (method, False, None)
    if model_name == "resnet":  # non-update steps only (each compilation takes minutes)
        del variants["magnitude-erk (no mask update)"]  # the same program as magnitude's
    else:
        variants["magnitude packed (no mask update)"] = ("magnitude", True, None)
        variants["rigl packed (no mask update)"] = ("rigl", True, None)
        for packed in (False, True):
            for method in ("magnitude", "rigl"):
                name = f"{method}{' packed' if packed else ''} (mask update every step)"
                variants[name] = (method, packed, 1)
    steps, states, hlo_bytes = {}, {}, {}
    for name, (method, packed, update) in variants.items():
        make_tx = _tx_factory(method, 1e-3, NEVER, packed, update)
        opt_state = make_tx(target, ticket, key).init(dense_state.params)
        step = _make_step(graphdef, make_tx, method == "ste", donate)
        # A copy per variant: a donating step deletes the buffers it is given.
        state = jax.tree.map(jnp.copy, dense_state._replace(opt_state=opt_state))
        if update is None:  # the path a non-update step takes
            text = step.lower(state, x, y, target, ticket, key).compile().as_text()
            hlo_bytes[name] = _hlo_bytes(text)
        steps[name] = step
        states[name] = step(state, x, y, target, ticket, key)  # compile
    # wall time, and the process's CPU time (all threads), which waiting for a
    # core on a loaded machine does not inflate
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}

    def call(name):  # each step takes the state the last one returned (donated or not)
        states[name] = steps[name](states[name], x, y, target, ticket, key)
        return states[name]

    for _ in range(rounds):  # interleaved
        for name in variants:
            times[name].extend(_time(lambda n=name: call(n), per_round))
            cpu[name].extend(_time(lambda n=name: call(n), per_round, time.process_time))
    med = {name: statistics.median(t) for name, t in times.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    return {
        name: {
            "median_ms": 1e3 * med[name],
            "ratio_vs_dense": med[name] / med["dense"],
            "median_cpu_ms": 1e3 * med_cpu[name],
            "cpu_ratio_vs_dense": med_cpu[name] / med_cpu["dense"],
            **(
                {
                    "hlo_bytes": hlo_bytes[name],
                    "hlo_bytes_vs_dense": hlo_bytes[name] / hlo_bytes["dense"],
                }
                if name in hlo_bytes
                else {}
            ),
        }
        for name in variants
    }


def mask_state_bytes() -> dict:
    """Bytes of the mask state of prune on LeNet-300-100 (784-300-100-10)."""
    params = nnx.state(models.LeNet300100(784, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    kernels = sum(v["kernel"].size for v in params.values())
    out = {"bool mask per kernel (1 byte per weight)": kernels}
    for name, packed in (("bool state", False), ("packed state", True)):
        state = pruning.prune(0.9, packed=packed).init(params)
        out[name] = sum(x.nbytes for x in jax.tree.leaves(state.masks))
    out["packed over bool"] = out["packed state"] / out["bool state"]
    return out


# ------------------------------------------------------------ (b) accuracy


def _model(name: str, seed: int) -> nnx.Module:
    if name == "lenet":
        return models.LeNet300100(64, rngs=nnx.Rngs(seed))
    return models.ResNet(20, 10, in_channels=1, rngs=nnx.Rngs(seed))


def accuracy_vs_sparsity(
    model_name: str,
    epochs: int,
    sparsities: list[float],
    seeds: list[int],
    methods: tuple[str, ...] = METHODS,
    need_dense: bool = True,
) -> dict:
    ds = data.load_digits()
    batch = 128
    per_epoch = len(ds.x_train) // batch  # the last partial batch is dropped
    steps = epochs * per_epoch
    lr = optax.cosine_decay_schedule(3e-3, steps)
    update = max(2, steps // 40)  # mask updates every `update` steps: ~20 per ramp
    graphdef, _ = train.init_train_state(_model(model_name, 0), optax.adam(lr))
    x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    evaluate = train.make_eval_step(graphdef)

    compiled: dict = {}

    def jitted(method):
        """The jitted step and init of ``method``, built once (one compilation each)."""
        if method not in compiled:
            make_tx = _tx_factory(method, lr, steps, update=update)
            init = jax.jit(lambda p, t, m, k: make_tx(t, m, k).init(p))
            compiled[method] = (_make_step(graphdef, make_tx, method == "ste"), init)
        return compiled[method]

    def run(method, seed, target, ticket):
        step, init = jitted(method)
        _, state = train.init_train_state(_model(model_name, seed), optax.adam(lr))
        key = jax.random.key(seed)
        state = state._replace(opt_state=init(state.params, target, ticket, key))
        order = np.random.default_rng(seed)
        for _ in range(epochs):
            perm = order.permutation(len(x_train))
            for i in range(per_epoch):
                idx = perm[i * batch : (i + 1) * batch]
                state = step(state, x_train[idx], y_train[idx], target, ticket, key)
        params = state.params
        if method == "ste":  # export: exact zeros at the pruned positions
            params = pruning.apply_masks(params, state.opt_state.masks)
            state = state._replace(params=params)
        acc = evaluate(state, x_test, y_test)["accuracy"]  # the whole test set, one batch
        return float(acc), float(pruning.sparsity_summary(params).total.sparsity), params

    rows, dense_params = [], {}
    start = time.perf_counter()
    for seed in seeds if need_dense or "static" in methods else ():
        acc, _, dense_params[seed] = run("dense", seed, jnp.float32(0.0), None)
        rows.append(
            {"method": "dense", "seed": seed, "target": 0.0, "sparsity": 0.0, "accuracy": acc}
        )
    for s in sparsities:
        for method in methods:
            for seed in seeds:
                ticket = (
                    pruning.magnitude_masks(dense_params[seed], s) if method == "static" else None
                )
                acc, actual, _ = run(method, seed, jnp.float32(s), ticket)
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "target": s,
                        "sparsity": actual,
                        "accuracy": acc,
                    }
                )
        print(f"  {model_name} sparsity {s:.2f} done ({time.perf_counter() - start:.0f} s)")
    return {
        "model": "LeNet-300-100 (64-300-100-10)" if model_name == "lenet" else "ResNet-20",
        "epochs": epochs,
        "steps": steps,
        "mask_update_every": update,
        "seeds": seeds,
        "wall_s": time.perf_counter() - start,
        "runs": rows,
        "summary": _summary(rows),
    }


def _merge(old: dict | None, new: dict) -> dict:
    """``new`` with the runs of ``old`` it does not repeat, if both trained alike."""
    same = ("model", "epochs", "steps", "mask_update_every")
    if not old or any(old.get(k) != new[k] for k in same) or old.get("quick") != new["quick"]:
        return new
    fresh = {(r["method"], r["seed"], r["target"]) for r in new["runs"]}
    runs = [r for r in old["runs"] if (r["method"], r["seed"], r["target"]) not in fresh]
    runs += new["runs"]
    part = {k: new[k] for k in ("seeds", "wall_s", "load")}
    part["methods"] = sorted({r["method"] for r in new["runs"]})
    return {
        **{k: v for k, v in old.items() if k != "parts"},
        "seeds": sorted({r["seed"] for r in runs}),
        "runs": runs,
        "summary": _summary(runs),
        "parts": [*old.get("parts", []), part],
    }


def _summary(rows: list[dict]) -> list[dict]:
    """Median, min and max accuracy over seeds per (method, target)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["method"], row["target"]), []).append(row)
    out = []
    for (method, target), group in groups.items():
        accs = [r["accuracy"] for r in group]
        out.append(
            {
                "method": method,
                "target": target,
                "sparsity": statistics.median(r["sparsity"] for r in group),
                "accuracy_median": statistics.median(accs),
                "accuracy_min": min(accs),
                "accuracy_max": max(accs),
            }
        )
    return out


# ------------------------------------------------------------ (c) inference


def sparse_inference(repeats: int) -> list[dict]:
    model = models.LeNet300100(784, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    x = jax.random.normal(jax.random.key(0), (128, 784))

    def forward(p, x):
        h = x
        for i, name in enumerate(("fc1", "fc2", "fc3")):
            h = h @ p[name]["kernel"] + p[name]["bias"][None, :]
            h = jax.nn.relu(h) if i < 2 else h
        return h

    fwd = jax.jit(forward)
    rows = []
    for s in (0.9, 0.95):
        dense = pruning.apply_masks(params, pruning.magnitude_masks(params, s))
        sp = pruning.to_sparse(dense)
        np.testing.assert_allclose(fwd(sp, x), fwd(dense, x), rtol=1e-4, atol=1e-4)
        t_dense, t_sparse = [], []
        for _ in range(5):  # interleaved
            t_dense += _time(lambda d=dense: fwd(d, x), repeats)
            t_sparse += _time(lambda p=sp: fwd(p, x), repeats)
        kernel_bytes = sum(v["kernel"].nbytes for v in dense.values())
        sparse_bytes = sum(
            v["kernel"].data.nbytes + v["kernel"].indices.nbytes for v in sp.values()
        )
        md, ms = statistics.median(t_dense), statistics.median(t_sparse)
        rows.append(
            {
                "sparsity": s,
                "dense_ms": 1e3 * md,
                "bcoo_ms": 1e3 * ms,
                "bcoo_over_dense": ms / md,
                "dense_kernel_bytes": kernel_bytes,
                "bcoo_kernel_bytes": int(sparse_bytes),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["overhead", "accuracy", "inference"],
        choices=["overhead", "accuracy", "inference"],
    )
    parser.add_argument(
        "--models", nargs="+", default=["lenet", "resnet"], choices=["lenet", "resnet"]
    )
    parser.add_argument(
        "--overhead-models", nargs="+", default=["lenet"], choices=["lenet", "resnet"]
    )
    parser.add_argument(
        "--donate",
        action="store_true",
        help="step overhead with every step donating its state (as jaxopt_nn.train does)",
    )
    parser.add_argument("--lenet-epochs", type=int, default=40)
    parser.add_argument("--resnet-epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98])
    args = parser.parse_args()
    quick = args.quick
    result = _load()
    result.update(
        {
            "device": str(jax.devices()[0].device_kind),
            "platform": platform.platform(),
            "jax": jax.__version__,
        }
    )
    if "overhead" in args.parts:
        keys: tuple[str, ...] = ("mask_state_bytes",)
        for name in args.overhead_models:
            print(f"(a) train-step overhead, {name}", flush=True)
            key = "step_overhead" if name == "lenet" else "step_overhead_resnet20"
            key += "_donated" if args.donate else ""
            before = os.getloadavg()
            rounds, per_round = (5, 5) if quick else (30, 7)
            result[key] = step_overhead(rounds, per_round, name, args.donate)
            result[f"{key}_load"] = {
                "loadavg_before": before,
                "loadavg_after": os.getloadavg(),
                "cpu_count": os.cpu_count(),
                "rounds": rounds,
                "steps_per_round": per_round,
                "batch": 128,
            }
            keys += (key, f"{key}_load")
            for variant, row in result[key].items():
                print(
                    f"{variant:42s} {row['median_ms']:8.3f} ms  x{row['ratio_vs_dense']:.3f}  "
                    f"cpu {row['median_cpu_ms']:8.3f} ms  x{row['cpu_ratio_vs_dense']:.3f}"
                    + (
                        f"  bytes {row['hlo_bytes'] / 1e6:.2f} MB x{row['hlo_bytes_vs_dense']:.3f}"
                        if "hlo_bytes" in row
                        else ""
                    )
                )
        result["mask_state_bytes"] = mask_state_bytes()
        for name, nbytes in result["mask_state_bytes"].items():
            print(f"{name:40s} {nbytes}")
        _save(result, keys)
    if "accuracy" in args.parts:
        result.setdefault("accuracy_vs_sparsity", {})
        for name in args.models:
            print(f"(b) accuracy vs sparsity, {name}", flush=True)
            epochs = 2 if quick else args.lenet_epochs if name == "lenet" else args.resnet_epochs
            old = result["accuracy_vs_sparsity"].get(name, {})
            seeds = args.seeds[:1] if quick else args.seeds
            have_dense = (old.get("epochs"), old.get("quick")) == (epochs, quick) and {
                r["seed"] for r in old.get("runs", []) if r["method"] == "dense"
            } >= set(seeds)
            before = os.getloadavg()
            section = accuracy_vs_sparsity(
                name,
                epochs,
                args.sparsities,
                seeds,
                tuple(args.methods),
                need_dense=not have_dense,
            )
            section["quick"] = quick
            section["load"] = {"loadavg_before": before, "loadavg_after": os.getloadavg()}
            # merged into the section as saved now: another run may have written it meanwhile
            fresh = _load().get("accuracy_vs_sparsity", {}).get(name, {})
            section = _merge(fresh, section)
            result["accuracy_vs_sparsity"][name] = section
            _save(result, (), (name,))
            for row in section["summary"]:
                print(
                    f"{row['method']:10s} target {row['target']:.2f} actual {row['sparsity']:.4f} "
                    f"acc {row['accuracy_median']:.4f} [{row['accuracy_min']:.4f}, "
                    f"{row['accuracy_max']:.4f}]"
                )
    if "inference" in args.parts:
        print("(c) BCOO inference", flush=True)
        result["sparse_inference"] = sparse_inference(10 if quick else 40)
        for row in result["sparse_inference"]:
            print(
                f"s={row['sparsity']:.2f} dense {row['dense_ms']:.3f} ms  "
                f"bcoo {row['bcoo_ms']:.3f} ms (x{row['bcoo_over_dense']:.2f})"
            )
        _save(result, ("sparse_inference",))


def _load() -> dict:
    """The saved results (``{}`` if none), without the older one-model accuracy layout."""
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    if isinstance(result.get("accuracy_vs_sparsity"), list):
        del result["accuracy_vs_sparsity"]
    for stale in ("quick", "epochs"):  # per-section now
        result.pop(stale, None)
    return result


def _save(result: dict, keys: tuple[str, ...], models: tuple[str, ...] = ()) -> None:
    """Write ``keys`` and the accuracy sections of ``models`` of ``result`` into the saved file.

    The file is read again first, so runs of other parts or models that finished
    since this one started are kept.
    """
    saved = _load()
    for key in ("device", "platform", "jax", *keys):
        saved[key] = result[key]
    for name in models:
        saved.setdefault("accuracy_vs_sparsity", {})[name] = result["accuracy_vs_sparsity"][name]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(saved, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
