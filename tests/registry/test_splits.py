import math
from collections import Counter

import pytest

from loraplex.registry.splits import choose_version

USERS = [f"user-{i}" for i in range(1000)]


def shares(split, salt="adapter-1") -> Counter:
    return Counter(choose_version(split, user, salt) for user in USERS)


def test_weighted_choice_within_binomial_tolerance():
    counts = shares({11: 90, 12: 10})
    # 4 standard deviations of a binomial(1000, 0.1): about 38 users, 3.8 points.
    tolerance = 4 * math.sqrt(len(USERS) * 0.9 * 0.1)
    assert abs(counts[12] - 100) <= tolerance
    assert counts[11] + counts[12] == len(USERS)


def test_three_way_split():
    counts = shares({1: 50, 2: 30, 3: 20})
    for version_id, weight in {1: 50, 2: 30, 3: 20}.items():
        expected = len(USERS) * weight / 100
        tolerance = 4 * math.sqrt(expected * (1 - weight / 100))
        assert abs(counts[version_id] - expected) <= tolerance


def test_same_user_same_version():
    split = {1: 50, 2: 50}
    for user in USERS[:100]:
        assert len({choose_version(split, user, "adapter-1") for _ in range(5)}) == 1


def test_order_of_the_mapping_does_not_matter():
    for user in USERS[:100]:
        assert choose_version({1: 70, 2: 30}, user, "s") == choose_version(
            {2: 30, 1: 70}, user, "s"
        )


def test_single_version_gets_everyone():
    assert shares({7: 100}) == Counter({7: len(USERS)})


def test_ramping_up_a_canary_keeps_its_users():
    canary_at_10 = {u for u in USERS if choose_version({1: 90, 2: 10}, u, "s") == 2}
    canary_at_20 = {u for u in USERS if choose_version({1: 80, 2: 20}, u, "s") == 2}
    assert canary_at_10 < canary_at_20


def test_salt_decorrelates_adapters():
    one = [choose_version({1: 50, 2: 50}, u, "adapter-1") for u in USERS]
    other = [choose_version({1: 50, 2: 50}, u, "adapter-2") for u in USERS]
    agreement = sum(a == b for a, b in zip(one, other, strict=True)) / len(USERS)
    assert 0.4 < agreement < 0.6  # independent coin flips agree about half the time


def test_salt_and_key_do_not_run_together():
    # Without a separator, ("ab", "c") and ("a", "bc") would hash the same string.
    split = {v: 1 for v in range(100)}
    assert choose_version(split, "c", "ab") != choose_version(split, "bc", "a")


def test_empty_split():
    with pytest.raises(ValueError, match="empty split"):
        choose_version({}, "user", "s")
