"""WebUI entry (AUTOMATIC1111, Forge): registers the Traindeck tab and its API routes, nothing else.

Both hosts cache a top-level `trainer` package in sys.modules and Forge keeps every
extension root on sys.path, so another extension's `trainer` could stand in for ours.
The package is therefore loaded from this extension's folder under its own name; a
clash with another `trainer` is reported, never silently used.
"""
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "traindeck_trainer"
log = logging.getLogger("traindeck")


def load_package():
    """This extension's trainer/ package as `traindeck_trainer` (relative imports make that work)."""
    ours = ROOT / "trainer"
    loaded = sys.modules.get(ALIAS)
    if loaded is not None and Path(loaded.__file__).resolve().parent == ours:
        return loaded
    other = sys.modules.get("trainer")
    other_file = getattr(other, "__file__", None) if other is not None else None
    if other_file and Path(other_file).resolve().parent != ours:
        log.warning("another extension's 'trainer' package is loaded from %s; Traindeck uses its own "
                    "from %s (as %s)", other_file, ours, ALIAS)
    spec = importlib.util.spec_from_file_location(ALIAS, ours / "__init__.py", submodule_search_locations=[str(ours)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = module
    spec.loader.exec_module(module)
    return module


load_package()
importlib.import_module(f"{ALIAS}.hosts.tab").register()
