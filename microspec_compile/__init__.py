"""microspec-compile: a torch.compile backend that gives a speculative-decoding draft
a sparse LM head over a live, context-sensitive active vocabulary (MicroSpec / NanoSpec).

>>> draft.compile(backend="microspec")                  # in place; HF generate sees it
>>> draft.compile(backend=microspec_compile.backend(capacity=2048, pinned_ids=[eos]))
>>> target.compile(backend=microspec_compile.observer(draft))  # target top-3 -> draft
>>> microspec_compile.vocab_of(draft).size
"""
from .backend import MicrospecConfig, backend, microspec
from .observer import observer
from .vocab import ActiveVocab, vocab_of

__all__ = ["ActiveVocab", "MicrospecConfig", "backend", "microspec", "observer", "vocab_of"]
__version__ = "0.1.0"
