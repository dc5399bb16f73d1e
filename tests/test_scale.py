"""Cost that stays flat in the number of leaves: the mask rules batch equally shaped leaves, so the compiled
selection (loops, reductions) and the number of compilations of ``tx.init`` do not grow with the leaf count."""

import collections

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxsparse as js
from jaxsparse.transforms.common import MASK_RULE_SCOPE


def _params(n, width):
    ks = jax.random.split(jax.random.PRNGKey(0), n)
    return {
        f"Dense_{i}": {"kernel": jax.random.normal(k, (width, width)), "bias": jnp.zeros(width)}
        for i, k in enumerate(ks)
    }


MAKERS = {
    "rigl": lambda: js.rigl(optax.adam(1e-3), 0.8, update_every=10, total_steps=100),
    "set": lambda: js.set_training(optax.adam(1e-3), 0.8, update_every=10, total_steps=100),
    "gmp": lambda: js.gradual_magnitude_pruning(optax.adam(1e-3), 0.8, 0, 100, 10),
    "gmp_global": lambda: js.gradual_magnitude_pruning(
        optax.adam(1e-3), 0.8, 0, 100, 10, scope="global"
    ),
}
HEAVY = (
    "while",
    "scan",
    "reduce_sum",
    "reduce_max",
    "reduce_min",
    "reduce_and",
    "reduce_or",
    "cond",
)


def _heavy_ops_in_mask_update(tx, params):
    """Counts loops, reductions and branches inside the algorithm's mask rule of one step (the ops traced under
    ``MASK_RULE_SCOPE``, and everything nested in them). The wrapper's own guards (the finiteness check and the
    pruned-weights check) reduce each leaf once by nature and are not part of the rule."""
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    counts = collections.Counter()

    def subjaxprs(e):
        for v in e.params.values():
            for x in v if isinstance(v, (list, tuple)) else [v]:
                x = getattr(x, "jaxpr", x)  # ClosedJaxpr -> Jaxpr
                if hasattr(x, "eqns"):
                    yield x

    def walk(j, inside):
        for e in j.eqns:
            here = inside or MASK_RULE_SCOPE in str(e.source_info.name_stack)
            if here and e.primitive.name in HEAVY:
                counts[e.primitive.name] += 1
            for s in subjaxprs(e):
                walk(s, here)

    walk(jaxpr, False)
    return counts


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_mask_update_does_not_unroll_per_leaf(name):
    few = _heavy_ops_in_mask_update(MAKERS[name](), _params(2, 8))
    many = _heavy_ops_in_mask_update(MAKERS[name](), _params(12, 8))
    assert few["scan"] + few["while"] >= 1  # the bisection loops (fori_loop) are there...
    assert few == many, (few, many)  # ...and do not multiply with the leaves


def test_mixed_shapes_cost_one_selection_per_shape():
    tx = MAKERS["rigl"]()
    p1 = {**_params(3, 8), "x": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    p2 = {**_params(9, 8), "x": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    assert _heavy_ops_in_mask_update(tx, p1) == _heavy_ops_in_mask_update(tx, p2)


def _count_compiles(fn):
    n = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            n[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return n[0]


@pytest.mark.parametrize("name", ["rigl", "gmp"])
def test_init_compiles_the_same_for_few_and_many_leaves(name):
    """``tx.init``'s compilations (one jitted selection per grouping of leaf shapes, cached elementwise ops per
    shape) do not grow with the leaves (fresh shapes, so nothing is cached between the two; first inits with
    the same leaf counts warm what depends only on the counts), and a second init of the same shapes compiles
    nothing."""
    _count_compiles(lambda: MAKERS[name]().init(_params(2, 20)))
    _count_compiles(lambda: MAKERS[name]().init(_params(12, 36)))
    few = _count_compiles(lambda: MAKERS[name]().init(_params(2, 24)))
    many = _count_compiles(lambda: MAKERS[name]().init(_params(12, 40)))
    assert many == few, (few, many)
    tx = MAKERS[name]()
    tx.init(_params(3, 56))
    assert _count_compiles(lambda: tx.init(_params(3, 56))) <= 1


@pytest.mark.parametrize("name", ["rigl", "set", "gmp"])
def test_a_new_transformation_reuses_the_compiled_init(name):
    """``tx.init`` is not one program per transformation: the selections are jitted per grouping of leaf shapes
    and shared, so a second transformation built for an already seen model compiles nothing (a sweep or a
    restart in the same process pays no init compile)."""
    params = _params(3, 44)
    MAKERS[name]().init(params)
    assert _count_compiles(lambda: MAKERS[name]().init(params)) == 0


def test_random_selection_program_does_not_grow_with_leaves():
    """The random initial masks hash and select per group of equally shaped leaves: the compiled program for
    2 leaves and for 24 leaves of one shape has the same size."""
    from jaxsparse import _groups, _topk

    def size(n):
        g = _groups.grouping([(16, 16)] * n)
        ks = jnp.full((n,), 50, jnp.int32)
        lowered = _topk.random_top.lower(g, jax.random.PRNGKey(0), n, tuple(range(n)), ks)
        return len(lowered.as_text().splitlines())

    assert size(2) == size(24)


@pytest.mark.parametrize("name", ["rigl", "gmp"])
def test_donated_step_copies_no_parameter(name):
    """With params and state donated, the step updates params in place: the pruned-weights check reads them
    inside a ``lax.cond`` and its count feeds every masked update, so XLA orders that read before the write
    instead of copying each parameter at entry (it copied all of them before)."""
    import re

    params = {f"l{i}": {"kernel": jnp.ones((12, 20)), "bias": jnp.zeros(20)} for i in range(3)}
    tx = MAKERS[name]()
    state = tx.init(params)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    entry = text[text.index("ENTRY") :]
    assert re.findall(r"= f32\[12,20\]\{[^}]*\} copy\(", entry) == []


@pytest.mark.parametrize("name", ["rigl", "set", "gmp", "snfs", "rigl_packed", "gmp_packed"])
def test_donated_step_copies_no_mask(name):
    """The stored masks pass through the mask-update cond on ordinary steps and stay in their donated buffers: the
    pruned-weights count runs inside that cond, the grown connections come out of it, and on update steps the new
    masks depend on both, so every read of the old masks comes before they are overwritten. With the count in a
    cond of its own and ``new & ~old`` taken after the cond, XLA copied every mask twice per step (at entry and in
    the pass-through), bool or packed."""
    import re

    params = {f"l{i}": {"kernel": jnp.ones((12, 20)), "bias": jnp.zeros(20)} for i in range(3)}
    adam = optax.adam(1e-3)
    tx = {
        "snfs": lambda: js.snfs(adam, 0.8, update_every=10, total_steps=100),
        "rigl_packed": lambda: js.rigl(
            adam, 0.8, update_every=10, total_steps=100, packed_masks=True
        ),
        "gmp_packed": lambda: js.gradual_magnitude_pruning(
            adam, 0.8, 0, 100, 10, packed_masks=True
        ),
    }.get(name, MAKERS.get(name))()
    state = tx.init(params)

    def step(p, s, g):
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s

    text = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile().as_text()
    assert re.findall(r"= (?:pred\[12,20\]|u8\[12,3\])\{[^}]*\} copy\(", text) == []


def _distinct_kernels(compiled_text: str) -> int:
    """How many different kernels a compiled CPU program holds: its fusions' computations, compared with names
    and metadata left out (XLA compiles a kernel once for all its identical fusions)."""
    import re

    bodies, name, lines = {}, None, []
    for line in compiled_text.splitlines():
        head = re.match(r"^%([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            name, lines = head.group(1), []
        elif line.startswith("}") and name is not None:
            bodies[name], name = lines, None
        elif name is not None:
            line = re.sub(r", metadata=\{.*?\}", "", line)
            lines.append(re.sub(r"%[\w.\-]+", "%", line).strip())
    called = set(re.findall(r"\bfusion\(.*?calls=%([\w.\-]+)", compiled_text))
    assert called, "no fusion found in the compiled program"
    return len({"\n".join(bodies[c]) for c in called})


@pytest.mark.parametrize("name", [*sorted(MAKERS), "rigl_packed"])
def test_compiled_step_has_as_many_kernels_for_few_and_many_leaves(name):
    """The whole compiled step (mask update included) holds about as many different kernels for 24 as for 12
    equally shaped layers: nothing per leaf is a kernel of its own. Compiling a different kernel costs far more
    than reusing one, so a cut of each leaf's new mask out of the rule's stacked result
    at a constant position (one kernel per leaf, as before ``SparseState.mask_slots``) made the compile time of a
    model of hundreds of layers several times that of dense training."""
    make = (
        (
            lambda: js.rigl(
                optax.adam(1e-3), 0.8, update_every=10, total_steps=100, packed_masks=True
            )
        )
        if name == "rigl_packed"
        else MAKERS[name]
    )

    def kernels(n):
        params = _params(n, 8)
        tx = make()

        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
        return _distinct_kernels(lowered.compile().as_text())

    few, many = kernels(12), kernels(24)
    assert many - few < 6, (
        few,
        many,
    )  # one kernel per leaf would add 12; sizes alone move a few fusions
