"""The public face: every name in ``__all__`` exists, each algorithm is defined once, and every removed or renamed
name still works for one release with a DeprecationWarning naming its replacement."""

import inspect

import jax.numpy as jnp
import optax
import pytest

import jaxsparse as js
from jaxsparse import lottery
from jaxsparse.transforms import dst, pruning
from jaxsparse.transforms._factory import PACKED_MASKS_ENTRY

TRANSFORMS = [
    js.fixed_masks,
    js.one_shot_pruning,
    js.gradual_magnitude_pruning,
    js.static_sparse,
    js.set_training,
    js.rigl,
    js.snfs,
    js.granet,
]


def test_every_public_name_resolves():
    assert len(js.__all__) == len(set(js.__all__))
    for name in js.__all__:
        assert hasattr(js, name), name


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.__name__)
def test_each_algorithm_is_one_rule_with_inner_first_and_the_wrapper_options_last(transform):
    params = list(inspect.signature(transform).parameters)
    rule_params = list(inspect.signature(transform.rule).parameters)
    assert params == ["inner", *rule_params, "seed", "packed_masks"]
    # the rule's docstring, plus the generated entry for packed_masks right after its seed entry
    entry = "".join(f"      {line}\n" for line in PACKED_MASKS_ENTRY)
    assert transform.__doc__ and transform.__doc__.replace(entry, "") == transform.rule.__doc__
    seed_at = transform.__doc__.index("\n      seed: ")
    assert transform.__doc__.index(entry) > seed_at
    assert transform.__name__ == transform.rule.__name__


def test_generated_transform_equals_sparse_training_of_its_rule():
    params = {"w": jnp.arange(16.0).reshape(4, 4) - 7.5}
    grads = {"w": jnp.ones((4, 4))}
    a = js.rigl(optax.sgd(0.1), 0.5, update_every=1, total_steps=10, seed=3)
    b = js.sparse_training(
        optax.sgd(0.1), js.rigl.rule(0.5, update_every=1, total_steps=10), seed=3
    )
    pa, pb = params, params
    sa, sb = a.init(pa), b.init(pb)
    for _ in range(3):
        ua, sa = a.update(grads, sa, pa)
        ub, sb = b.update(grads, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    assert (pa["w"] == pb["w"]).all() and (sa.masks["w"] == sb.masks["w"]).all()
    assert int(sa.masks["w"].sum()) == 8 and int((pa["w"] != 0).sum()) <= 8


DEPRECATED = [
    (js, "sparse_evolutionary_training", "jaxsparse.set_training"),
    (js, "cosine_fraction", "drop_fraction_schedule"),
    (js, "dst_algorithm", "rule"),
    (js, "static_sparse_algorithm", "jaxsparse.static_sparse.rule"),
    (js, "set_algorithm", "jaxsparse.set_training.rule"),
    (js, "rigl_algorithm", "jaxsparse.rigl.rule"),
    (js, "snfs_algorithm", "jaxsparse.snfs.rule"),
    (js, "granet_algorithm", "jaxsparse.granet.rule"),
    (js, "fixed_masks_algorithm", "jaxsparse.fixed_masks.rule"),
    (js, "one_shot_algorithm", "jaxsparse.one_shot_pruning.rule"),
    (js, "gmp_algorithm", "jaxsparse.gradual_magnitude_pruning.rule"),
    (dst, "rigl_algorithm", "jaxsparse.rigl.rule"),
    (dst, "sparse_evolutionary_training", "jaxsparse.set_training"),
    (pruning, "gmp_algorithm", "jaxsparse.gradual_magnitude_pruning.rule"),
    (lottery, "rewind", "jaxsparse.apply_masks"),
]


@pytest.mark.parametrize("module, name, instead", DEPRECATED, ids=lambda x: str(x))
def test_deprecated_names_warn_and_still_work(module, name, instead):
    with pytest.warns(
        DeprecationWarning, match=rf"`{module.__name__}\.{name}` is deprecated.*{instead}"
    ):
        obj = getattr(module, name)
    assert callable(obj)
    assert name not in getattr(module, "__all__", [])


def test_deprecated_names_compute_what_they_did():
    with pytest.warns(DeprecationWarning):
        cosine = js.cosine_fraction(0.3, 100)
    assert [round(float(cosine(t)), 4) for t in (0, 50, 100, 200)] == [0.3, 0.15, 0.0, 0.0]
    with pytest.warns(DeprecationWarning):
        rewound = lottery.rewind({"w": jnp.array([1.5, 2.5])}, {"w": jnp.array([False, True])})
    assert rewound["w"].tolist() == [0.0, 2.5]
    with pytest.warns(DeprecationWarning):
        algo = js.rigl_algorithm(0.5, total_steps=10)
    assert isinstance(algo, js.MaskAlgorithm)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        js.no_such_name  # noqa: B018
