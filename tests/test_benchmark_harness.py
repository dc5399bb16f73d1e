"""The benchmarks' timing harness: how contenders are ordered when they are timed against each other."""

import collections
import pathlib
import sys

import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import _harness  # noqa: E402


def test_time_interleaved_gives_no_contender_a_fixed_predecessor():
    # A contender inherits the cache left by the one timed before it; a fixed or rotated order keeps each
    # contender's predecessor and timed two copies of one program up to 2x apart (issue #18's twin control).
    # A chain of a few calls that starts with its copies out of cache timed three copies of one program up to
    # 10% apart: each chain is preceded by an untimed call on each copy.
    log = []

    def contender(name):
        def call(i):
            log.append((name, i))
            return jnp.zeros(())

        return call

    names = ["dense_dot", "densify", "sparse", "auto", "twin"]
    medians = _harness.time_interleaved(
        {n: contender(n) for n in names}, copies=2, chain=3, repeats=20
    )
    assert sorted(medians) == sorted(names) and all(t > 0 for t in medians.values())
    timed = log[len(names) * 2 :]  # after the warm-up (one call per copy each)
    per_chain = 2 + 3  # one untimed call per copy, then the timed chain
    assert len(timed) == len(names) * per_chain * 20
    chains = [timed[i][0] for i in range(0, len(timed), per_chain)]
    assert all(
        [c for c, _ in timed[i : i + per_chain]] == [chains[i // per_chain]] * per_chain
        for i in range(0, len(timed), per_chain)
    )
    # every chain starts with its own pass over the weight copies, then rotates them
    assert all(
        [i for _, i in timed[j : j + per_chain]] == [0, 1, 0, 1, 0]
        for j in range(0, len(timed), per_chain)
    )
    rounds = [chains[r : r + len(names)] for r in range(0, len(chains), len(names))]
    assert all(sorted(r) == sorted(names) for r in rounds)  # every contender once per round
    before = collections.defaultdict(set)
    for r in rounds:
        for prev, name in zip(r, r[1:]):
            before[name].add(prev)
    assert all(len(before[n]) >= 3 for n in names), dict(before)
