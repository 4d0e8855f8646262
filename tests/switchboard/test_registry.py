"""Expert declarations are checked when defined; the registry loads entry points and refuses duplicates."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from switchboard.errors import DuplicateExpert, ExpertDefinitionError, UnknownExpert
from switchboard.expert import Example, Expert, ExpertResult, ImageRef
from switchboard.registry import Registry, get_registry


class A(BaseModel):
    image: ImageRef
    query: str


def make(**overrides):
    attrs = {"name": "thing", "description": "does things", "Args": A, "Result": ExpertResult,
             "examples": [Example(request="find the {object}", args={"image": "{image}", "query": "{object}"})]}
    attrs.update(overrides)
    return type("Thing", (Expert,), attrs)


@pytest.mark.parametrize("overrides, needle", [
    ({"name": "Bad Name"}, "`name`"),
    ({"name": None}, "`name`"),
    ({"description": "  "}, "`description`"),
    ({"Args": dict}, "`Args`"),
    ({"Result": BaseModel}, "`Result`"),
    ({"queue": "Q!"}, "`queue`"),
    ({"time_limit": -1}, "`time_limit`"),
    ({"examples": ["find it"]}, "`examples`"),
    ({"examples": [Example(request="find {nope}", args={"image": "{image}", "query": "x"})]}, "unknown slot"),
    ({"examples": [Example(request="find it", args={"image": "{image}"})]}, "does not validate"),
    ({"phrasings": "spot the {object}"}, "`phrasings`"),
    ({"phrasings": ["spot the {nope}"]}, "unknown slot"),
    ({"phrasings": ["spot it"]}, "slots of examples"),
    ({"phrasings": ["spot the {object}"], "examples": []}, "at least one example"),
])
def test_definition_time_checks(overrides, needle) -> None:
    with pytest.raises(ExpertDefinitionError, match=needle):
        make(**overrides)


def test_phrasings_with_the_slots_of_the_first_example_are_accepted() -> None:
    cls = make(phrasings=["spot the {object}", "where is the {object}?"])
    assert cls.phrasings == ["spot the {object}", "where is the {object}?"]


def test_unknown_arguments_are_forbidden() -> None:
    cls = make()
    with pytest.raises(Exception, match="Extra inputs"):
        cls.Args.model_validate({"image": "image-" + "a" * 24, "query": "x", "other": 1})


def test_reserved_argument_names() -> None:
    class Bad(BaseModel):
        id: str

    with pytest.raises(ExpertDefinitionError, match="reserved"):
        make(Args=Bad, examples=[])


def test_duplicate_names_name_both_packages() -> None:
    reg = Registry()
    reg.register(make(), "pkg-one")
    reg.register(reg.get_class("thing"), "pkg-one")  # same class twice is harmless
    with pytest.raises(DuplicateExpert, match="pkg-one.*pkg-two"):
        reg.register(make(), "pkg-two")


def test_unknown_expert_lists_available() -> None:
    reg = Registry()
    reg.register(make(), "p")
    with pytest.raises(UnknownExpert, match="registered experts: thing"):
        reg.get_class("nope")


def test_builtins_come_through_entry_points() -> None:
    reg = get_registry()
    assert "crop" in reg
    assert reg.package_of("crop") == "switchboard"


def test_instances_are_lazy_and_shared() -> None:
    calls = []

    class Slow(make()):
        def setup(self) -> None:
            calls.append(1)

    reg = Registry()
    reg.register(Slow, "p")
    inst = reg.instance("thing")
    assert inst is reg.instance("thing") and not inst.is_setup and calls == []
    inst.ensure_setup()
    inst.ensure_setup()
    assert calls == [1]
    inst.teardown()
    assert not inst.is_setup
