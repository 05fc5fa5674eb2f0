"""The embedded demo: `n2eye demo` trains an N2-Eye from scratch on CPU in minutes and proves that it sees.

The shapes world (`world`: scenes and drawing; `questions`: sessions; `baselines`: what a model blind to the image
scores; `writers`: the files `n2eye train` and `n2eye eval` read), the vision tower's pretraining on it
(`vision`), the demo's picture (`figures`) and the command itself (`command`). Nothing outside this package
imports it: the rest of n2eye does not depend on the demo (`n2eye bench` runs `python -m n2eye.demo.writers`).

`DemoConfig` and `run_demo` resolve lazily, so importing a module of the world does not import the command.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {"DemoConfig": "command", "run_demo": "command"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
