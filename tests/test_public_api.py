"""The package's public API: every name in __all__ resolves, lazily, to the object in its home module."""

import importlib
import subprocess
import sys

import raybackfill


def test_every_exported_name_resolves_to_its_home_object():
    for name in raybackfill.__all__:
        value = getattr(raybackfill, name)
        home = raybackfill._EXPORTS.get(name)
        if home is not None:
            assert value is getattr(importlib.import_module(home), name)


def test_unknown_name_is_an_attribute_error():
    try:
        raybackfill.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light():
    code = "import sys, raybackfill; raybackfill.Strategy; print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_py_typed_marker_ships():
    from importlib.resources import files

    assert files("raybackfill").joinpath("py.typed").is_file()


def test_all_lists_exactly_the_exports():
    assert sorted(raybackfill.__all__) == sorted(["NAMESPACE", "__version__", *raybackfill._EXPORTS])
