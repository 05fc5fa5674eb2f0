"""Raw rows (CRAG-MM, chat `messages`, LLaVA, The Cauldron, ShareGPT) -> Conversations for training and evaluation.

Exports resolve lazily, so `import n2eye.data.<module>` (e.g. the collator) does not pull in `datasets`.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "CragLabels": "cragmm",
    "cragmm_to_conversation": "cragmm",
    "find_class_label": "cragmm",
    "is_egocentric": "cragmm",
    "FORMATS": "formats",
    "FORMAT_DESCRIPTIONS": "formats",
    "ConversationAdapter": "formats",
    "cauldron_to_conversation": "formats",
    "check_format": "formats",
    "detect_format": "formats",
    "iter_conversations": "formats",
    "llava_to_conversation": "formats",
    "load_conversations": "formats",
    "make_adapter": "formats",
    "messages_to_conversation": "formats",
    "raw_image_view": "formats",
    "sharegpt_to_conversation": "formats",
    "NoUsableRowsError": "report",
    "SkipReport": "report",
    "SkipRow": "report",
    "load_source": "sources",
    "parse_spec": "sources",
    "spec_base_dir": "sources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
