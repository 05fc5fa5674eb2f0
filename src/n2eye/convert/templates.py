"""The chat template that leaves N2-Eye: other runtimes render it without our processor, so the processor's
default system prompt is written into it and the training-only `{% generation %}` markers can be dropped."""

from __future__ import annotations

import json
import re

_BUILTIN = re.compile(r'(\{%-?\s*set builtin_system_prompt\s*=\s*)"(?:[^"\\]|\\.)*"(\s*-?%\})')
_GENERATION = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


def exported_chat_template(template: str | None, default_system_prompt: str | None, keep_generation: bool = True):
    """`template` as another runtime should render it with no extra variables: N2-Eye's template with the
    processor's default system prompt (none for `None` or "") as its built-in one; other templates unchanged.
    `keep_generation=False` drops `{% generation %}` markers (llama.cpp's template engine does not know them)."""
    if not template:
        return template
    if _BUILTIN.search(template):
        prompt = json.dumps(default_system_prompt or "", ensure_ascii=False)
        template = _BUILTIN.sub(lambda m: f"{m.group(1)}{prompt}{m.group(2)}", template, count=1)
    return template if keep_generation else _GENERATION.sub("", template)


__all__ = ["exported_chat_template"]
