"""The dataclasses whose `__init__` is written out (for mypyc to compile: docs/gateway.md,
"The native build") take their fields as the dataclass's own `__init__` would: the same
names in the same order, the same defaults, each value stored under its own name."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from datetime import date
from typing import Any

import pytest

import cardcodec
import gateway
from cardcodec.subfields import Track2
from gateway.ledger.hotpath import Lot


def _written_out() -> list[type[Any]]:
    found: list[type[Any]] = []
    for package in (cardcodec, gateway):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" in info.name:
                continue
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if (
                    isinstance(value, type)
                    and value.__module__ == module.__name__
                    and dataclasses.is_dataclass(value)
                    and not value.__dataclass_params__.init  # type: ignore[attr-defined]
                ):
                    found.append(value)
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


WRITTEN_OUT = _written_out()


def test_the_hot_path_s_value_classes_are_among_them() -> None:
    names = {cls.__qualname__ for cls in WRITTEN_OUT}
    assert {"Message", "Request", "Context", "Outcome", "PlannedRedemption"} <= names


@pytest.mark.parametrize("cls", WRITTEN_OUT, ids=lambda cls: cls.__qualname__)
def test_a_written_out_init_stores_every_field_under_its_own_name(cls: type[Any]) -> None:
    if not inspect.isfunction(cls.__init__):
        pytest.skip("compiled: the source build checks the same code")
    fields = dataclasses.fields(cls)
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in parameters] == [f.name for f in fields]
    marks = {f.name: object() for f in fields}  # a distinct value for each field
    made = cls(**marks)
    assert {f.name: getattr(made, f.name) for f in fields} == marks
    assert made == cls(*marks.values())


@pytest.mark.parametrize("cls", WRITTEN_OUT, ids=lambda cls: cls.__qualname__)
def test_a_written_out_init_has_the_fields_defaults(cls: type[Any]) -> None:
    if not inspect.isfunction(cls.__init__):
        pytest.skip("compiled: the source build checks the same code")
    required = {
        f.name: object()
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    made = cls(**required)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            assert getattr(made, f.name) is f.default, f.name
        elif f.default_factory is not dataclasses.MISSING:
            assert getattr(made, f.name) == f.default_factory(), f.name
            assert getattr(made, f.name) is not getattr(cls(**required), f.name), f.name


@pytest.mark.parametrize("cls", WRITTEN_OUT, ids=lambda cls: cls.__qualname__)
def test_a_frozen_one_stays_frozen(cls: type[Any]) -> None:
    if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        pytest.skip("not frozen")
    if not inspect.isfunction(cls.__init__):
        pytest.skip("compiled: see the test below")
    fields = dataclasses.fields(cls)
    made = cls(**{f.name: object() for f in fields})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(made, fields[0].name, 1)


def test_a_compiled_frozen_one_stays_frozen_too() -> None:
    """The written-out `__init__` stores with `object.__setattr__`, which mypyc compiles to a
    plain store; a store from outside still meets the dataclass's refusal."""
    track = Track2("6210985800012345678", "2812", "101", "")
    lot = Lot(1, date(2027, 1, 31), 500)
    with pytest.raises(dataclasses.FrozenInstanceError):
        track.card_number = "6210985800012345679"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        lot.remaining_points = 10**6  # type: ignore[misc]
    assert (track.card_number, lot.remaining_points) == ("6210985800012345678", 500)
