import pytest

from loraplex.registry import InvalidInput, NotFound

WHERE = "adapter 'bot' of tenant 'acme'"


@pytest.fixture
def three_versions(push):
    return [push(seed=seed) for seed in range(3)]


def current(registry) -> dict[int, int]:
    return registry.show_adapter("acme", "bot").split


def splits(registry) -> list[dict[int, int]]:
    return [d.split for d in registry.deployment_history("acme", "bot")]


def test_first_version_is_deployed_later_ones_are_not(registry, three_versions):
    assert current(registry) == {1: 100}
    assert splits(registry) == [{1: 100}]


def test_push_with_promote(registry, push):
    push(seed=1)
    push(seed=2, promote=True)
    assert splits(registry) == [{1: 100}, {2: 100}]


def test_promote(registry, three_versions):
    assert registry.promote("acme", "bot", 3, actor="bob") == {3: 100}
    assert current(registry) == {3: 100}
    (first, latest) = registry.deployment_history("acme", "bot")
    assert (first.seq, first.actor, latest.seq, latest.actor) == (1, "alice", 2, "bob")


def test_promoting_the_current_version_changes_nothing(registry, three_versions):
    assert registry.promote("acme", "bot", 1, actor="bob") == {1: 100}
    assert splits(registry) == [{1: 100}]


def test_split(registry, three_versions):
    assert registry.split("acme", "bot", {1: 90, 3: 10}, actor="bob") == {1: 90, 3: 10}
    info = registry.show_adapter("acme", "bot")
    assert (info.split, info.active) == ({1: 90, 3: 10}, 1)
    registry.split("acme", "bot", {2: 50, 3: 50}, actor="bob")
    assert registry.show_adapter("acme", "bot").active == 3  # a tie goes to the newest


@pytest.mark.parametrize(
    "weights, error, message",
    [
        ({}, InvalidInput, f"^a split of {WHERE} needs at least one version$"),
        ({1: 90, 2: 20}, InvalidInput, "^split weights must sum to 100, not 110$"),
        ({1: 100, 2: 0}, InvalidInput, "^the weight of v2 must be a positive integer, not 0$"),
        ({1: 110, 2: -10}, InvalidInput, "^the weight of v2 must be a positive integer, not -10$"),
        (
            {1: 99.5, 2: 0.5},
            InvalidInput,
            "^the weight of v1 must be a positive integer, not 99.5$",
        ),
        ({1: True, 2: 99}, InvalidInput, "^the weight of v1 must be a positive integer, not True$"),
        ({1: 90, 7: 10}, NotFound, f"^{WHERE} has no version v7; versions: v1, v2, v3$"),
    ],
)
def test_invalid_splits(registry, three_versions, weights, error, message):
    with pytest.raises(error, match=message):
        registry.split("acme", "bot", weights, actor="bob")
    assert splits(registry) == [{1: 100}]


def test_promote_a_missing_version(registry, three_versions):
    with pytest.raises(NotFound, match=f"^{WHERE} has no version v9; versions: v1, v2, v3$"):
        registry.promote("acme", "bot", 9, actor="bob")


def test_rollback_restores_the_previous_split_and_toggles(registry, three_versions):
    registry.split("acme", "bot", {1: 90, 2: 10}, actor="bob")
    registry.promote("acme", "bot", 2, actor="bob")
    assert registry.rollback("acme", "bot", actor="carol") == {1: 90, 2: 10}
    assert registry.rollback("acme", "bot", actor="carol") == {2: 100}
    assert registry.rollback("acme", "bot", actor="carol") == {1: 90, 2: 10}
    history = registry.deployment_history("acme", "bot")
    assert [d.split for d in history] == [
        {1: 100},
        {1: 90, 2: 10},
        {2: 100},
        {1: 90, 2: 10},
        {2: 100},
        {1: 90, 2: 10},
    ]
    assert [d.seq for d in history] == [1, 2, 3, 4, 5, 6]
    assert [d.actor for d in history][-3:] == ["carol"] * 3


def test_rollback_without_an_earlier_split(registry, three_versions):
    with pytest.raises(InvalidInput, match=f"^{WHERE} has no earlier deployment to roll back to$"):
        registry.rollback("acme", "bot", actor="bob")


def test_deployments_of_a_missing_adapter(registry, acme):
    for change in (
        lambda: registry.promote("acme", "nope", 1, actor="bob"),
        lambda: registry.split("acme", "nope", {1: 100}, actor="bob"),
        lambda: registry.rollback("acme", "nope", actor="bob"),
        lambda: registry.deployment_history("acme", "nope"),
    ):
        with pytest.raises(NotFound, match="^adapter 'nope' of tenant 'acme' does not exist$"):
            change()


def test_deployments_are_per_adapter(registry, push):
    push(seed=1)
    push(seed=2)
    push(seed=3, adapter="other")
    push(seed=4, adapter="other")
    registry.promote("acme", "other", 2, actor="bob")
    assert current(registry) == {1: 100}
    assert registry.show_adapter("acme", "other").split == {2: 100}
