"""Moved: the tiny test builders are ``tests/builders.py`` in the source checkout (not installed).

This shim re-exports them for one release when run from a source checkout.
"""

try:
    from tests.builders import *  # noqa: F401,F403
except ImportError as exc:  # an installed package has no tests/
    raise ImportError("vico.tiny moved to tests/builders.py in the source checkout (test-only builders are not "
                      "installed); the toy world's tokenizer is vico.word_tokenizer.make_tokenizer") from exc
