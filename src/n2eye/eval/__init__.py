"""Evaluation: scoring model answers against references (``scoring``, pure Python) and the ``n2eye eval`` loop."""
