"""Every exception and warning gqla_compile raises on purpose lives in ``errors.py`` and is importable from
the package itself."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import gqla_compile
from gqla_compile import errors


def _package_modules():
    """Every module of the package that imports here (one needing an optional dependency that is not
    installed, e.g. vLLM for the serving plugin, is left out)."""
    for info in pkgutil.walk_packages(gqla_compile.__path__, prefix="gqla_compile."):
        if info.name.endswith(".__main__"):  # runs the command line when imported
            continue
        try:
            yield importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "gqla_compile":
                raise


def _public_error_classes() -> set[type]:
    """The GqlaError subclasses and warnings defined anywhere in the package (private ones excluded)."""
    found = set()
    for module in _package_modules():
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and obj.__module__.startswith("gqla_compile") and not name.startswith("_")
                    and (issubclass(obj, errors.GqlaError) or issubclass(obj, Warning))):
                found.add(obj)
    return found


def test_every_error_and_warning_is_defined_in_errors_and_importable_from_the_package():
    classes = _public_error_classes()
    names = {cls.__name__ for cls in classes}
    # the walk saw the classes raised across the package (not an empty set that passes trivially)
    assert {"GqlaError", "HealError", "ReportError", "CompileError", "OutputExistsError", "UnsafeCheckpointError",
            "ModelNotFoundError", "ShapeMismatchError", "PartialRewriteWarning", "NoLatentAttentionWarning"} <= names
    for cls in classes:
        assert cls.__module__ == "gqla_compile.errors", f"{cls.__name__} is defined in {cls.__module__}"
        assert getattr(gqla_compile, cls.__name__) is cls
        assert cls.__name__ in gqla_compile.__all__


def test_errors_module_holds_only_what_the_package_exports():
    defined = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and obj.__module__ == errors.__name__}
    assert defined <= set(gqla_compile.__all__)
    assert issubclass(errors.HealError, ValueError) and issubclass(errors.OutputExistsError, FileExistsError)
