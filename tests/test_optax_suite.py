"""optax's own tests, run against jaxopt_nn's constructors with their assertions unchanged.

optax ships its test modules in the installed package. Each test here
replaces optax's Adam/AdamW/NAdam(W)/RMSprop constructors and their
``scale_by_*`` building blocks by ours (in ``optax``, ``optax._src.alias``
and ``optax._src.transform``), imports a fresh copy of one optax test module
(its parametrization tables are built at import, so they pick ours up), and
runs with ``unittest`` the test cases whose parameters name one of these
optimizers. A skipped case counts as a failure: optax skips, for example,
the schedule test of an optimizer whose ``learning_rate`` annotation it
cannot read.
"""

import importlib
import re
import sys
import unittest

import optax
import optax._src.alias
import optax._src.transform
import pytest

from jaxopt_nn import optim

OURS = {
    "adam": optim.adam,
    "adamw": optim.adamw,
    "nadam": optim.nadam,
    "nadamw": optim.nadamw,
    "rmsprop": optim.rmsprop,
    "scale_by_adam": optim.scale_by_adam,
    "scale_by_rms": optim.scale_by_rms,
    "scale_by_stddev": optim.scale_by_stddev,
}


@pytest.fixture
def with_our_constructors(monkeypatch):
    for module in (optax, optax._src.alias, optax._src.transform):
        for name, fn in OURS.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, fn)


def _fresh_import(module_name):
    """The module, imported anew (its tables see the constructors patched in now)."""
    sys.modules.pop(module_name, None)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.modules.pop(module_name, None)


def _run(module_name, class_name, pattern, *, skip=None):
    """Run the cases of ``class_name`` whose description (name and parameters) matches.

    Fails on any failure, error or skip, except a skip whose reason is ``skip``.
    """
    cls = getattr(_fresh_import(module_name), class_name)
    cases = [
        case
        for case in unittest.TestLoader().loadTestsFromTestCase(cls)
        if re.search(pattern, str(case))
    ]
    assert cases, f"no case of {module_name}.{class_name} matches {pattern!r}"
    result = unittest.TestResult()
    unittest.TestSuite(cases).run(result)
    problems = [
        f"{kind} {case}:\n{text}"
        for kind, found in (("FAIL", result.failures), ("ERROR", result.errors))
        for case, text in found
    ] + [f"SKIP {case}: {reason}" for case, reason in result.skipped if reason != skip]
    assert not problems, "\n".join(problems)
    return result.testsRun


# Parameters that select our optimizers in optax's tables.
_OURS = r"opt_name='(adam|adamw|nadam|nadamw|rmsprop)'"


# (test, regex on its parameters). Within the time of a unit test: every
# optimizer of ours where a case is fast, else the complex cases (which need
# |g|**2) and half precision for Adam, NAdamW and RMSprop.
_THREE = r"opt_name='(adam|nadamw|rmsprop)'"
_ALIAS_CASES = [
    ("test_optimization", r"opt_name='(adam|rmsprop)'.*_setup_parabola.*complex64"),
    ("test_optimizers_accept_extra_args", _OURS),
    ("test_optimizers_can_be_wrapped_in_inject_hyperparams", _THREE),
    ("test_explicit_dtype", _OURS),
    ("test_preserve_dtype", rf"{_THREE}.*bfloat16"),
    ("test_state_shape_dtype_shard_stability", rf"{_THREE}.*complex64'>"),
    ("test_gradient_accumulation", rf"{_THREE}.*bfloat16"),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("test, params", _ALIAS_CASES)
def test_alias_test(with_our_constructors, test, params):
    assert optax._src.alias.adam is optim.adam
    assert _run("optax._src.alias_test", "AliasTest", rf"^{test}\d+ .*{params}") >= 1


def test_transform_test(with_our_constructors):
    assert optax._src.transform.scale_by_adam is optim.scale_by_adam
    ran = _run(
        "optax._src.transform_test",
        "TransformTest",
        r"^(test_scalers_(adam|rmsprop|stddev)|test_rms_match_adam) ",
    )
    assert ran == 4


def test_inject_test(with_our_constructors):
    # Every case that injects into scale_by_adam.
    pattern = (
        r"^test_(constant_hyperparams|numeric_static_args|hyperparam_dtypes|"
        r"hyperparam_default_dtype)"
    )
    assert _run("optax.schedules._inject_test", "InjectHyperparamsTest", pattern) >= 9


def test_accumulation_test(with_our_constructors):
    # test_multi_steps accumulates into scale_by_adam; the mixed-precision
    # cases take minutes, their dtypes are covered by test_gradient_accumulation.
    assert (
        _run("optax.transforms._accumulation_test", "AccumulationTest", r"^test_multi_steps ") == 1
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # optax.noisy_sgd in its table
def test_sharding_test(with_our_constructors):
    # optax gates its sharding-in-types cases on ``jax.__version__ < '0.7.2'``,
    # a string comparison that skips them on jax 0.10 and 0.12 alike; the same
    # checks run for our optimizers under an explicit 8-device mesh in
    # tests/parallel_scripts/eight_devices.py.
    pattern = r"^test_\w+_(adam|adamw|nadam|nadamw|rmsprop) "
    ran = _run(
        "optax._src.sharding_test", "ShardingTest", pattern, skip="Skipping sharding-in-types test"
    )
    assert ran == 15


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_contrib_common_test(with_our_constructors):
    # The case that reads ``learning_rate``'s annotation, and extra arguments,
    # for our optimizers inside contrib's ``mechanize`` wrapper.
    pattern = (
        r"^test_optimizers_accept_(learning_rate_schedule_if_type_annotated_as_such|"
        rf"extra_args)\d+ .*{_THREE}"
    )
    assert _run("optax.contrib._common_test", "ContribTest", pattern) >= 6
