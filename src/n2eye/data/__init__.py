"""Raw rows (CRAG-MM, chat `messages`, LLaVA) -> Conversations for training and evaluation.

Exports resolve lazily, so `import n2eye.data.<module>` (e.g. the collator) does not pull in `datasets`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CragLabels": "cragmm",
    "cragmm_to_conversation": "cragmm",
    "find_class_label": "cragmm",
    "is_egocentric": "cragmm",
    "FORMATS": "formats",
    "FORMAT_DESCRIPTIONS": "formats",
    "ConversationAdapter": "formats",
    "check_format": "formats",
    "detect_format": "formats",
    "iter_conversations": "formats",
    "llava_to_conversation": "formats",
    "load_conversations": "formats",
    "make_adapter": "formats",
    "messages_to_conversation": "formats",
    "raw_image_view": "formats",
    "NoUsableRowsError": "report",
    "SkipReport": "report",
    "SkipRow": "report",
    "load_source": "sources",
    "parse_spec": "sources",
    "spec_base_dir": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'n2eye.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"n2eye.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
