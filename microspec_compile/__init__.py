"""microspec-compile: a torch.compile backend that gives a speculative-decoding draft
a sparse LM head over a live, context-sensitive active vocabulary (MicroSpec / NanoSpec).

>>> microspec_compile.assisted(target, draft)            # HF assisted generation, set up
>>> draft.compile(backend="microspec")                  # in place; HF generate sees it
>>> vocab = microspec_compile.ActiveVocab(draft.lm_head.weight, capacity=2048, pinned_ids=[eos])
>>> draft.compile(backend=microspec_compile.backend(vocab=vocab))
>>> target.compile(backend=microspec_compile.observer(vocab))  # target top-3 -> draft
>>> with microspec_compile.using(other_request_vocab): ...     # one head, many requests
>>> microspec_compile.vocab_of(draft).size                     # the head's default vocabulary
"""
from .assisted import assisted
from .backend import MicrospecConfig, backend, microspec
from .observer import observer
from .vocab import ActiveVocab, using, vocab_of

__all__ = ["ActiveVocab", "MicrospecConfig", "assisted", "backend", "microspec", "observer",
           "using", "vocab_of"]
__version__ = "0.1.0"
