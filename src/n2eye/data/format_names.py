"""The `--format` names, in a module of their own so config checks and flag help need no `datasets` import."""

FORMATS = ("cragmm", "messages", "llava", "cauldron", "sharegpt")
