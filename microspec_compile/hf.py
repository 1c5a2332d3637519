"""Hugging Face calling conventions, decided in one place.

The KV cache keyword of models and decoder layers changed name: transformers 5.17 takes
``past_key_values=``, later releases take ``cache=`` (and keep ``past_key_values`` as a
deprecated alias until 5.40).  A keyword a forward does not know is swallowed by its
``**kwargs``: the cache is then never written, and a multi-token query attends to its own
rows only, with no error.  So the keyword is read off the forward's signature
(:func:`cache_kwargs`), and the loops check that a forward grew the cache by the tokens it
was given (:func:`check_cache_grew`).
"""
from __future__ import annotations

import functools
import inspect

import transformers
from packaging.version import Version

__all__ = ["MIN_TRANSFORMERS", "cache_keyword", "cache_kwargs", "check_cache_grew"]

MIN_TRANSFORMERS = "5.17"  # the oldest release the loops were run under (make test-compat)

if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(f"microspec_compile needs transformers >= {MIN_TRANSFORMERS}; "
                      f"transformers {transformers.__version__} is installed")


@functools.cache
def _keyword_of(forward) -> str:
    parameters = inspect.signature(forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{getattr(forward, '__qualname__', forward)} takes neither cache= nor "
                    f"past_key_values=: cannot pass it a KV cache")


def cache_keyword(module) -> str:
    """``"cache"`` or ``"past_key_values"``: the KV-cache keyword ``module``'s forward takes.

    Read from the class's ``forward`` (``functools.wraps`` decorators expose the wrapped
    signature), once per class."""
    return _keyword_of(type(module).forward)


def cache_kwargs(module, cache) -> dict:
    """``{keyword: cache}`` for a call of ``module`` (a HF model, base model or layer)."""
    return {cache_keyword(module): cache}


def check_cache_grew(cache, before: int, added: int, what: str = "forward") -> None:
    """Raise if ``cache`` does not hold ``before + added`` rows after a forward of ``added``
    tokens: the model ignored the cache it was given, and its attention was wrong."""
    now = cache.get_seq_length()
    if now != before + added:
        raise RuntimeError(f"{what}: the KV cache holds {now} rows after a forward of {added} "
                           f"tokens over {before} cached ones (expected {before + added}); the "
                           f"model did not write the cache it was given (transformers "
                           f"{transformers.__version__})")
