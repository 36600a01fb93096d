"""The name -> builder registry alone: name resolution, options read from signatures, the option check."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_decent.registry import Registry


class Parent:
    def __init__(self, lr: float = 0.1, momentum: float = 0.0) -> None:
        self.lr, self.momentum = lr, momentum


class Child(Parent):
    def __init__(self, period: int = 4, **options: Any) -> None:
        super().__init__(**options)
        self.period = period


def shape(n: int, width: int = 2, *extra: int) -> tuple[int, int]:
    return n, width


@pytest.fixture
def registry() -> Registry[object]:
    return Registry("widget", {"parent": Parent, "child": Child}, aliases={"kid": "child"})


def test_names_are_matched_without_case_with_dash_for_underscore_and_through_aliases(registry: Registry) -> None:
    assert registry.names() == ("parent", "child")
    assert [registry.resolve(n) for n in ("Parent", " CHILD ", "kid", "Kid")] == ["parent", "child", "child", "child"]
    spaced = Registry("widget", {"two_words": Parent})
    assert spaced.resolve("Two-Words") == "two_words"


def test_an_unknown_name_lists_the_valid_names_aliases_and_note() -> None:
    registry = Registry("widget", {"parent": Parent, "child": Child}, aliases={"kid": "child"}, note="or 'x_' ones")
    with pytest.raises(ValueError) as info:
        registry.resolve("uncle")
    assert str(info.value) == "Unknown widget 'uncle'; valid names: parent, child (aliases: kid=child) (or 'x_' ones)."


def test_options_follow_a_forwarded_options_parameter_to_the_parent_class(registry: Registry) -> None:
    assert registry.options("parent") == ("lr", "momentum")
    assert registry.options("kid") == ("period", "lr", "momentum")


def test_leading_positional_arguments_are_no_options_and_shared_options_are_appended() -> None:
    registry = Registry("shape", {"shape": shape}, leading=1, shared_options=("repeat", "width"))
    assert registry.options("shape") == ("width", "repeat")
    assert registry.build("shape", 5, width=3) == (5, 3)


def test_an_unknown_option_is_refused_naming_the_accepted_ones(registry: Registry) -> None:
    with pytest.raises(ValueError) as info:
        registry.check_options("kid", {"period": 2, "beta": 1, "alpha": 2})
    assert str(info.value) == (
        "widget 'child' does not take option(s) ['alpha', 'beta']; its options are: period, lr, momentum."
    )
    empty = Registry("widget", {"none": lambda: None})
    with pytest.raises(ValueError, match=r"'none' does not take option\(s\) \['lr'\]; its options are: none\.$"):
        empty.build("none", lr=1)


def test_build_passes_the_options_to_the_builder(registry: Registry) -> None:
    child = registry.build("child", period=8, lr=0.5)
    assert isinstance(child, Child)
    assert (child.period, child.lr, child.momentum) == (8, 0.5, 0.0)


def test_register_refuses_a_taken_or_unnormalised_name_and_an_alias_to_nothing(registry: Registry) -> None:
    with pytest.raises(ValueError, match="already registered"):
        registry.register("child", Parent)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("kid", Parent)
    with pytest.raises(ValueError, match="under 'my_widget', not 'My-Widget'"):
        registry.register("My-Widget", Parent)
    with pytest.raises(TypeError, match="must be callable"):
        registry.register("number", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names 'ghost', which is not registered"):
        Registry("widget", {"parent": Parent}, aliases={"g": "ghost"})


def test_as_a_mapping_it_holds_canonical_names_only(registry: Registry) -> None:
    registry.register("cousin", Parent)
    assert list(registry) == ["parent", "child", "cousin"] and len(registry) == 3
    assert registry["child"] is Child and "kid" not in registry and "child" in registry
    assert registry.aliases == {"kid": "child"}


def test_communicators_are_chosen_by_name_through_their_registry() -> None:
    from lightning_decent import DecentralizedStrategy
    from lightning_decent.comm import COMMUNICATOR_REGISTRY, COMMUNICATORS

    assert COMMUNICATORS == ("p2p", "allreduce") and COMMUNICATOR_REGISTRY.resolve("P2P") == "p2p"
    assert COMMUNICATOR_REGISTRY.options("p2p") == ("timeout", "check_finite", "collectives")
    with pytest.raises(ValueError, match=r"Unknown communicator 'gossip'; valid names: p2p, allreduce"):
        DecentralizedStrategy(communicator="gossip")
