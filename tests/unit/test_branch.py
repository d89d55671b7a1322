"""Branches are interned values: equal fields give one object, so the dicts keyed by
branch at every step hash and compare them by identity (guidekit/branch.py)."""

from __future__ import annotations

import copy
import pickle

import attrs

import guidekit
from guidekit.branch import COND, UNCOND, Branch, cond, uncond


def test_equal_fields_are_one_object() -> None:
    assert Branch() is cond() is Branch("main", COND, None)
    assert Branch(cond=UNCOND) is uncond()
    assert cond() != uncond() and cond("weak") != cond()
    assert hash(cond()) == hash(Branch())


def test_copies_and_pickles_are_the_interned_object() -> None:
    pag = guidekit.PAG(3)
    (perturbed,) = [b for b in guidekit.compile(guidekit.CFG(7) + pag).branches
                    if b.perturbation is not None]
    for b in (cond(), uncond("weak"), perturbed):
        assert copy.copy(b) is b
        assert copy.deepcopy(b) is b
        assert pickle.loads(pickle.dumps(b)) is b
        assert attrs.evolve(b) is b


def test_equal_perturbations_give_the_same_branch() -> None:
    a = guidekit.compile(guidekit.CFG(7) + guidekit.PAG(3)).branches
    b = guidekit.compile(guidekit.CFG(7.0) + guidekit.PAG(3.0)).branches
    assert a == b and all(x is y for x, y in zip(a, b))
    c = guidekit.compile(guidekit.CFG(7) + guidekit.SEG(2)).branches
    assert a[-1] != c[-1] and a[-1] is not c[-1]


def test_a_branch_is_still_a_frozen_value() -> None:
    b = cond()
    try:
        b.cond = UNCOND  # type: ignore[misc]
    except attrs.exceptions.FrozenInstanceError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a branch must be frozen")
    assert b.cond == COND and b.label == "c" and repr(uncond("weak")) == "u@weak"


def test_threads_making_one_branch_get_one_object() -> None:
    import threading

    made: list[Branch] = []
    start = threading.Barrier(8)

    def make() -> None:
        start.wait()
        made.append(Branch("threaded", COND, ("x", 1)))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 8 and all(b is made[0] for b in made)
