import pytest

from secdfd.common.engine.prng import Stream, new_seed, purpose


def test_streams_are_deterministic_and_separated_by_purpose():
    seed = new_seed()
    a = Stream(seed, "x").ring((1000,))
    assert Stream(seed, "x").ring((1000,)).equal(a)
    assert not Stream(seed, "y").ring((1000,)).equal(a)
    assert not Stream(new_seed(), "x").ring((1000,)).equal(a)
    assert purpose("bundle", 3, "r") == "bundle/3/r"


def test_seed_length_checked():
    with pytest.raises(ValueError):
        Stream(b"short", "x")
