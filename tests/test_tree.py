import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_nn import tree


class _Mlp(nnx.Module):
    def __init__(self, *, rngs):
        self.Dense_0 = nnx.Linear(3, 4, rngs=rngs)
        self.Dense_1 = nnx.Linear(4, 2, rngs=rngs)


def _linen_style(model):
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}


def test_path_names_drop_nnx_value_attribute():
    model = _Mlp(rngs=nnx.Rngs(0))
    names = [n for n, _ in tree.leaves_with_names(nnx.state(model, nnx.Param))]
    assert names == ["Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]


def test_path_names_for_sequences():
    params = {"layers": [{"kernel": jnp.ones((2, 2))}, {"kernel": jnp.ones((2, 2))}]}
    assert [n for n, _ in tree.leaves_with_names(params)] == [
        "layers/0/kernel",
        "layers/1/kernel",
    ]


def test_default_where_selects_floating_kernels_only():
    params = {
        "kernel": jnp.ones((3, 4)),
        "bias": jnp.ones(4),
        "table": jnp.ones((3, 4), jnp.int32),
        "scale": jnp.float32(1.0),
    }
    assert tree.select(params) == {"kernel": True, "bias": False, "table": False, "scale": False}


def test_where_on_linen_dict_and_nnx_state_gives_same_leaves():
    model = _Mlp(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    linen = _linen_style(model)

    def only_first(name, leaf):
        return "Dense_0" in name and leaf.ndim == 2

    for where in (None, only_first):
        nnx_names = tree.selected_names(state, where)
        linen_names = [n.removeprefix("params/") for n in tree.selected_names(linen, where)]
        assert nnx_names == linen_names
    assert tree.selected_names(state, only_first) == ["Dense_0/kernel"]


def test_where_as_bool_prefix_tree_broadcasts():
    params = {"a": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "c": jnp.ones((2, 2))}
    assert tree.select(params, {"a": True, "c": False}) == {
        "a": {"w": True, "b": True},
        "c": False,
    }


def test_where_bad_structure_names_argument():
    with pytest.raises(TypeError, match="where"):
        tree.select({"a": jnp.ones(2)}, {"zzz": True})
    with pytest.raises(TypeError, match="where must hold Python bools"):
        tree.select({"a": jnp.ones(2)}, {"a": 3})
    with pytest.raises(TypeError, match=r"got the class where=Param: filter the state first"):
        tree.select({"a": jnp.ones(2)}, nnx.Param)


def test_values_by_name_orders_by_names_and_refuses_missing_or_extra_names():
    assert tree.values_by_name({"b": 2, "a": 1}, ["a", "b"], "bits") == [1, 2]
    with pytest.raises(ValueError, match=r"bits must map .*; missing \['b'\], not selected \[\]"):
        tree.values_by_name({"a": 1}, ["a", "b"], "bits")
    with pytest.raises(ValueError, match=r"missing \[\], not selected \['c'\]"):
        tree.values_by_name({"a": 1, "b": 2, "c": 3}, ["a", "b"], "bits")


def test_map_selected_touches_only_selected_leaves():
    params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    out = tree.map_selected(lambda x: x * 0, params)
    np.testing.assert_array_equal(out["w"], np.zeros((2, 3)))
    np.testing.assert_array_equal(out["b"], np.ones(3))


def test_count_params_and_summary_agree_with_shapes():
    model = _Mlp(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    assert tree.count_params(state) == 3 * 4 + 4 + 4 * 2 + 2
    assert tree.count_params(state, None) == 3 * 4 + 4 * 2
    rows = tree.size_summary(state)
    assert sum(r.nbytes for r in rows) == 4 * tree.count_params(state)
    assert [r.selected for r in rows] == [False, True, False, True]


def test_none_leaves_are_skipped():
    params = {"w": jnp.ones((2, 2)), "missing_bias": None}
    assert tree.count_params(params) == 4
    assert jax.tree.leaves(tree.select(params)) == [True]
