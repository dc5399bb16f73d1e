"""``packed_masks=True``: masks kept 1 bit per weight train bit-identically to bool masks.

The packing itself (``jaxsparse/_bitmask.py``) round-trips every shape exactly and matches NumPy's
``packbits(..., bitorder="little")``; a packed run equals the bool run (params, masks, optimizer state) for
RigL, SET, SNFS, GMP and a 2:4 magnitude rule, with 1/8 of the mask bytes, one compilation, on an 8-device mesh
(the bits keep their parameter's sharding), and through a checkpoint.
"""

import inspect

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariants import count_lowerings
from hypothesis import given
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxsparse as js
from jaxsparse import checkpoint
from jaxsparse._bitmask import PackedMask, bits_sharding, pack, parts_for, unpack
from jaxsparse.transforms.common import MaskAlgorithm


# ------------------------------------------------------------------------------------------------ packing
@given(
    shape=st.lists(st.integers(0, 19), min_size=0, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_round_trip_is_exact_and_matches_numpy_packbits(shape, seed):
    mask = np.random.default_rng(seed).random(shape) < 0.5
    packed = pack(jnp.asarray(mask))
    n = shape[-1] if shape else 1
    assert packed.shape == shape and packed.bits.dtype == jnp.uint8
    assert packed.bits.shape == (*shape[:-1], -(-n // 8))  # leading axes kept; 0-d -> (1,)
    np.testing.assert_array_equal(
        np.asarray(packed.bits),
        np.packbits(mask.reshape(shape or (1,)), axis=-1, bitorder="little"),  # padding bits zero
    )
    back = unpack(packed)
    assert back.dtype == jnp.bool_ and back.shape == shape
    np.testing.assert_array_equal(np.asarray(back), mask)


@pytest.mark.parametrize("shape", [(), (13,), (3, 16), (2, 5, 9)])
def test_pack_round_trip_under_jit(shape):
    mask = np.random.default_rng(len(shape)).random(shape) < 0.5
    jitted = jax.jit(lambda m: unpack(pack(m)))(jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(jitted), mask)


def test_unpack_keeps_vmapped_batch_axes_in_front():
    masks = np.random.default_rng(0).random((3, 2, 5, 11)) < 0.5  # 3 stacked (2, 5, 11) masks
    packed = jax.vmap(pack)(jnp.asarray(masks))
    assert packed.shape == (2, 5, 11) and packed.bits.shape == (3, 2, 5, 2)
    np.testing.assert_array_equal(np.asarray(unpack(packed)), masks)
    with pytest.raises(ValueError, match="do not hold a mask of shape"):
        unpack(PackedMask(packed.bits[..., :1], (2, 5, 11)))


@pytest.mark.parametrize("parts", [2, 3])
def test_packing_per_share_round_trips_and_starts_each_share_on_a_word(parts):
    mask = (
        np.random.default_rng(parts).random((5, parts * 10)) < 0.5
    )  # shares of 10: two words each
    packed = pack(jnp.asarray(mask), parts)
    assert packed.bits.shape == (5, parts * 2) and packed.parts == parts
    shares = mask.reshape(5, parts, 10)
    want = np.packbits(shares, axis=-1, bitorder="little").reshape(5, parts * 2)
    np.testing.assert_array_equal(np.asarray(packed.bits), want)
    np.testing.assert_array_equal(np.asarray(unpack(packed)), mask)
    with pytest.raises(ValueError, match="4 parts do not split a last axis of 6"):
        pack(jnp.ones((2, 6), bool), 4)


def test_parts_and_bits_sharding_follow_the_parameter():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    put = lambda shape, *spec: jax.device_put(jnp.zeros(shape), NamedSharding(mesh, P(*spec)))
    # 64 columns over 2 devices: 32 each, whole words -> one share, the parameter's sharding
    p = put((32, 64), "data", "model")
    assert parts_for(p) == 1 and bits_sharding(p.sharding, p.shape).spec == P("data", "model")
    # 20 columns over 2 devices: 10 each -> packed per share, still the parameter's sharding
    p = put((32, 20), "data", "model")
    assert parts_for(p) == 2 and bits_sharding(p.sharding, p.shape).spec == P("data", "model")
    p = put((4, 24), None, ("data", "model"))  # 3 per device
    assert parts_for(p) == 8 and bits_sharding(p.sharding, p.shape).spec == P(
        None, ("data", "model")
    )
    p = put(
        (8, 24), "data"
    )  # last axis unsharded: trailing None dropped, as jit writes its outputs
    assert parts_for(p) == 1 and bits_sharding(p.sharding, p.shape).spec == P("data")
    assert parts_for(jnp.zeros((4, 20))) == 1  # uncommitted: one share
    assert bits_sharding(p.sharding, ()).spec == P()


# ------------------------------------------------------------------------------------------------ training


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (12, 20)), "bias": jnp.zeros(20)},
        "stacked": jax.random.normal(k[1], (2, 8, 12)),  # (layers, in, out) of a scanned model
        "out": jax.random.normal(k[2], (20, 16)),
    }


_TILT = jax.tree.map(
    lambda p: jax.random.uniform(jax.random.PRNGKey(p.size), p.shape, minval=-1.0), _params()
)


def _loss(params, _):
    """Elementwise in the params, so sharded and single-device runs agree bit for bit; the tilt makes the
    gradient at pruned (zero) weights nonzero and distinct, so growth picks real winners."""
    return sum(
        jnp.sum(jnp.sin(3 * p) * p + t * p)
        for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(_TILT))
    )


def _nm_rule(n=2, m=4, every=2):
    """A 2:4 rule that can regrow: the N:M masks of ``|w| + |dense gradient|``, recomputed every ``every`` steps."""
    where = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)
    masks = lambda scores: js.nm_masks(scores, n, m, where=where)
    score = lambda ctx: jax.tree.map(lambda p, g: jnp.abs(p) + jnp.abs(g), ctx.params, ctx.grads)
    return MaskAlgorithm(
        init=lambda params, key: (masks(params), ()),
        update=lambda ctx: (masks(score(ctx)), ctx.extra),
        is_update=lambda step: (step > 0) & (step % every == 0),
        grows=True,
    )


ALGORITHMS = {
    "rigl": lambda packed: js.rigl(
        optax.adam(0.05), 0.7, update_every=2, total_steps=20, packed_masks=packed
    ),
    "set": lambda packed: js.set_training(
        optax.sgd(0.05, momentum=0.9), 0.7, update_every=2, end_step=20, packed_masks=packed
    ),
    "snfs": lambda packed: js.snfs(
        optax.adam(0.05), 0.7, update_every=2, end_step=20, packed_masks=packed
    ),
    "gmp": lambda packed: js.gradual_magnitude_pruning(
        optax.adamw(0.05), 0.8, begin_step=0, end_step=6, frequency=2, packed_masks=packed
    ),
    "nm_2:4": lambda packed: js.sparse_training(
        optax.adam(0.05), _nm_rule(), seed=0, packed_masks=packed
    ),
}


def _run(tx, params, steps=7):
    @jax.jit
    def run_step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p, None), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for _ in range(steps):
        params, state = run_step(params, state)
    return params, state


def _assert_same_run(a, b):
    (pa, sa), (pb, sb) = a, b
    jax.tree.map(np.testing.assert_array_equal, pa, pb)
    jax.tree.map(np.testing.assert_array_equal, js.state_masks(sa), js.state_masks(sb))
    jax.tree.map(np.testing.assert_array_equal, sa.inner_state, sb.inner_state)
    jax.tree.map(np.testing.assert_array_equal, sa.extra, sb.extra)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_packed_run_is_bit_identical_to_bool_masks(name):
    params = _params()
    plain = _run(ALGORITHMS[name](False), params)
    with count_lowerings("run_step") as seen:
        packed = _run(ALGORITHMS[name](True), params)
    assert len(seen) == 1, seen  # the whole run (update steps 2, 4, 6 included) compiles once
    _assert_same_run(plain, packed)
    masks = js.state_masks(packed[1])
    leaves = jax.tree.leaves(packed[1].masks, is_leaf=lambda x: isinstance(x, PackedMask))
    assert leaves and all(isinstance(m, PackedMask) for m in leaves)
    assert packed[1].masks["dense"]["bias"] is None and masks["dense"]["bias"] is None
    # the masks did change over the run (update steps 2, 4, 6) and pruned weights are exactly zero
    first = js.state_masks(ALGORITHMS[name](True).init(params))
    assert any(bool((a != b).any()) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(masks)))
    for p, m in zip(
        jax.tree.leaves(packed[0]), jax.tree.leaves(masks, is_leaf=lambda x: x is None)
    ):
        if m is not None:
            assert int(jnp.sum(~m)) > 0 and int(jnp.sum((p != 0) & ~m)) == 0


def test_packed_mask_state_is_one_bit_per_weight():
    params = {"a": jnp.ones((4, 64)), "b": jnp.ones((3, 16, 24)), "c": jnp.ones((5, 13))}
    tx = lambda packed: js.static_sparse(optax.sgd(0.1), 0.5, packed_masks=packed)
    nbytes = lambda s: sum(x.nbytes for x in jax.tree.leaves(s.masks))
    plain, packed = tx(False).init(params), tx(True).init(params)
    assert nbytes(plain) == 4 * 64 + 3 * 16 * 24 + 5 * 13
    assert nbytes(packed) == (4 * 64 + 3 * 16 * 24) // 8 + 5 * 2  # 13 entries take 2 words per row
    assert 8 * (nbytes(packed) - 5 * 2) == nbytes(plain) - 5 * 13


def _mesh_params():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {
        "dense": {
            "kernel": P("data", "model"),
            "bias": P("model"),
        },  # 20 -> 10 per device: misaligned
        "stacked": P(None, "data", "model"),  # 12 -> 6 per device: misaligned
        "out": P("data", "model"),  # 16 -> 8 per device: whole words
    }
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), _params(), specs)


@pytest.mark.parametrize("name", ["rigl", "gmp"])
def test_sharded_packed_run_compiles_once_and_keeps_the_bits_sharding(name):
    assert jax.device_count() == 8  # tests/conftest.py forces 8 CPU devices
    tx = ALGORITHMS[name](True)

    def packed_sharded_step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p, None), s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(packed_sharded_step)
    with count_lowerings("packed_sharded_step") as seen:
        params = _mesh_params()
        state = tx.init(params)
        for _ in range(7):  # mask updates at steps 2, 4, 6
            masks = state.masks
            assert masks["dense"]["bias"] is None
            # the kernel's 20 columns split 10 per device (not whole words): packed per share
            assert masks["dense"]["kernel"].parts == 2 and masks["dense"]["kernel"].bits.shape == (
                12,
                4,
            )
            assert masks["stacked"].parts == 2 and masks["stacked"].bits.shape == (
                2,
                8,
                2,
            )  # 6 each
            assert masks["out"].parts == 1 and masks["out"].bits.shape == (
                20,
                2,
            )  # 8 each: whole words
            for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(params)[1:]):
                assert m.sharding == p.sharding  # every leaf of this tree shards its last axis
            params, state = step(params, state)
        jax.block_until_ready(params)
    assert len(seen) == 1, seen
    # the same placement with bool masks: the same masks; params equal up to XLA's fusion of the sharded program
    reference = _run(ALGORITHMS[name](False), _mesh_params())
    jax.tree.map(np.testing.assert_array_equal, js.state_masks(state), reference[1].masks)
    for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(reference[0])):
        eps = float(np.finfo(np.float32).eps)
        np.testing.assert_allclose(got, ref, rtol=0, atol=4 * eps * float(np.max(np.abs(ref))))


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    tx = ALGORITHMS["rigl"](True)
    params, state = _run(tx, _mesh_params(), steps=3)
    tree = {"params": params, "opt_state": state}
    checkpoint.save(tmp_path / "ckpt", tree)
    assert "opt_state/masks/out/bits" in checkpoint.layout(tree)["leaves"]
    restored = checkpoint.restore(tmp_path / "ckpt", tree)
    jax.tree.map(np.testing.assert_array_equal, restored, tree)
    assert restored["opt_state"].masks["out"].shape == (20, 16)
    assert restored["opt_state"].masks["out"].bits.sharding == state.masks["out"].bits.sharding

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(_loss)(p, None), s, p)
        return optax.apply_updates(p, updates), s

    jax.tree.map(
        np.testing.assert_array_equal,
        step(params, state),
        step(restored["params"], restored["opt_state"]),
    )


# ------------------------------------------------------------------------------------------------ the edges
def test_leak_check_still_reads_packed_masks():
    tx = optax.chain(ALGORITHMS["rigl"](True), optax.add_decayed_weights(1e-1))
    with pytest.raises(Exception, match="must produce the final updates"):
        _run(tx, _params(), steps=3)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_packed_masks_raises_naming_it(bad):
    with pytest.raises(TypeError, match=rf"`packed_masks` must be a bool; got {bad!r}"):
        js.rigl(optax.sgd(0.1), 0.5, total_steps=10, packed_masks=bad)
    with pytest.raises(TypeError, match="`packed_masks` must be a bool"):
        js.sparse_training(optax.sgd(0.1), js.fixed_masks.rule({}), packed_masks=bad)


def test_a_state_stored_the_other_way_raises_naming_the_option():
    params = _params()
    packed, plain = ALGORITHMS["gmp"](True), ALGORITHMS["gmp"](False)
    with pytest.raises(ValueError, match="packed_masks=False"):
        plain.update(params, packed.init(params), params)
    with pytest.raises(ValueError, match="packed_masks=True"):
        packed.update(params, plain.init(params), params)
    other = {**params, "out": jnp.ones((20, 8))}
    with pytest.raises(ValueError, match=r"\['out'\] packs a mask of shape \(20, 16\)"):
        packed.update(other, packed.init(params), other)


def test_mask_functions_refuse_packed_masks_and_state_masks_reads_them():
    params = _params()
    tx = ALGORITHMS["gmp"](True)
    state = optax.chain(optax.clip(1.0), tx).init(params)
    with pytest.raises(ValueError, match=r"packed_masks=True.*jaxsparse\.state_masks"):
        js.apply_masks(params, state[1].masks)
    with pytest.raises(ValueError, match=r"packed_masks=True\): read them as bool masks"):
        js.imp_masks(params, state[1].masks)
    masks = js.state_masks(state)  # found inside the chain
    jax.tree.map(np.testing.assert_array_equal, masks, js.state_masks(tx.init(params)))
    jax.tree.map(
        np.testing.assert_array_equal, js.apply_masks(params, masks), params
    )  # GMP starts dense
    jax.tree.map(
        np.testing.assert_array_equal,
        js.state_masks(ALGORITHMS["gmp"](False).init(params)),
        masks,
    )  # and the bool state reads the same
    with pytest.raises(ValueError, match="exactly one jaxsparse SparseState; found 0"):
        js.state_masks(optax.adam(0.1).init(params))


def test_every_training_transform_takes_and_documents_packed_masks():
    transforms = [getattr(js, n) for n in js.__all__ if hasattr(getattr(js, n), "rule")]
    assert {t.__name__ for t in transforms} >= {"rigl", "set_training", "acdc", "srigl", "chase"}
    for transform in transforms:
        parameter = inspect.signature(transform).parameters["packed_masks"]
        assert parameter.kind is parameter.KEYWORD_ONLY and parameter.default is False
        assert "packed_masks: store the masks 1 bit per weight" in transform.__doc__
    params = {"w": jnp.ones((4, 10))}
    state = js.acdc(optax.sgd(0.1), 0.5, total_steps=10, packed_masks=True).init(params)
    assert state.masks["w"].bits.shape == (4, 2)


def test_nnx_optimizer_trains_with_packed_masks():
    from flax import nnx

    model = nnx.Linear(12, 20, rngs=nnx.Rngs(0))
    tx = js.rigl(optax.adam(1e-2), 0.5, update_every=1, total_steps=10, packed_masks=True)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    first = js.state_masks(opt.opt_state)

    @nnx.jit
    def step(model, opt, x):
        opt.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

    for _ in range(3):
        step(model, opt, jnp.ones((3, 12)))
    masks = js.state_masks(opt.opt_state)
    assert masks["bias"] is None and masks["kernel"].dtype == jnp.bool_
    assert int(masks["kernel"].sum()) == 120 and bool((masks["kernel"] != first["kernel"]).any())
    assert int(((model.kernel.get_value() != 0) & ~masks["kernel"]).sum()) == 0


def test_ordinary_steps_unpack_inside_the_fused_update():
    """No bool mask of a parameter's shape is materialised by the step itself: the unpacking is fused into the
    elementwise passes that read it (the mask rule's branch unpacks for itself, on update steps only)."""
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 96)), "v": jnp.ones((96, 40))}
    tx = js.rigl(optax.adam(1e-2), 0.8, update_every=100, total_steps=10**6, packed_masks=True)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    hlo = jax.jit(step).lower(params, tx.init(params), params).compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    assert "u8[64,12]" in entry and "u8[96,5]" in entry  # the bits come in and go out
    assert "pred[64,96]" not in entry and "pred[96,40]" not in entry
