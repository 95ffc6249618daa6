"""Adversarial routing on 2 ranks (EP = 2) against 1 rank (EP = 1), every CoE iteration,
dropless and with a capacity factor: outputs and every gradient equal (rel. error <= 1e-5).
Experts 0-3 live on rank 0, 4-7 on rank 1.  Plus a property-based test (hypothesis) over random
routing maps and token counts.  Every test runs on gloo/CPU, and over NCCL on 2 GPUs with
``pytest -m gpu`` (tests/ranks.py DEVICES)."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ranks import DEVICES
from routing_workers import C, N, Workers


@pytest.fixture(scope="module", params=DEVICES)
def workers(request):
    w = Workers(request.param)
    yield w
    w.close()


def plan(tokens, fn):
    """C iterations x (2 * tokens) global tokens -> list of experts."""
    return [[fn(t, gid) for gid in range(2 * tokens)] for t in range(C)]


def pairs(gid, allowed):
    a = allowed[gid % len(allowed)]
    b = allowed[(gid + 1 + gid // len(allowed)) % len(allowed)]
    return [a, b] if a != b else [a, allowed[(allowed.index(a) + 1) % len(allowed)]]


CASES = {
    # every token of both ranks to one expert (on rank 1): rank 0's experts get nothing
    "all-tokens-one-expert": (1, lambda t, gid: [5]),
    # rank 0 receives zero tokens in every iteration
    "rank0-receives-nothing": (2, lambda t, gid: pairs(gid, [4, 5, 6, 7])),
    # expert 3 receives zero tokens from every rank
    "expert3-never-chosen": (2, lambda t, gid: pairs(gid, [0, 1, 2, 4, 5, 6, 7])),
    # iteration 1 uses only rank 0's experts, iteration 2 only rank 1's
    "routing-flips-between-iterations": (2, lambda t, gid: pairs(gid, [0, 1, 2, 3] if t == 0
                                                                 else [4, 5, 6, 7])),
}


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["dropless", "capacity0.5"])
@pytest.mark.parametrize("name", list(CASES))
def test_adversarial_routing(workers, name, capacity):
    topk, fn = CASES[name]
    tokens = 6
    case = {"topk": topk, "capacity": capacity, "tokens": tokens, "seed": 3,
            "plans": plan(tokens, fn)}
    assert workers.compare(case) == []


@pytest.mark.parametrize("capacity", [None, 0.5], ids=["dropless", "capacity0.5"])
def test_batch_of_one_token(workers, capacity):
    case = {"topk": 2, "capacity": capacity, "tokens": 1, "seed": 4,
            "plans": [[[1, 6], [2, 3]], [[7, 4], [0, 5]]]}
    assert workers.compare(case) == []


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topk=st.sampled_from([1, 2]), capacity=st.sampled_from([None, 0.5, 1.0]),
       tokens=st.integers(min_value=1, max_value=9), seed=st.integers(0, 2**16))
def test_random_routing_maps_ep2_equals_ep1(workers, topk, capacity, tokens, seed):
    rng = random.Random(seed)
    plans = [[rng.sample(range(N), topk) for _ in range(2 * tokens)] for _ in range(C)]
    case = {"topk": topk, "capacity": capacity, "tokens": tokens, "seed": seed, "plans": plans}
    assert workers.compare(case) == []
