"""Every ``microspec::`` op of the sparse LM head and the vocabulary gather, in one place.

Importing this module defines the five ops (``OPS``), each with its fake (meta)
implementation so that Dynamo, AOTAutograd and Inductor can trace them with symbolic
shapes; no other module of the package defines or registers one:

``microspec::observe``        mutates the vocabulary state (adds unseen ids).
``microspec::sparse_topk``    top-k (argmax is k=1) over the active rows.
``microspec::sparse_full``    full-vocabulary logits / probabilities / log-probs.
``microspec::observe_start``  ``observe``, on CUDA on the vocabulary's side stream.
``microspec::observe_wait``   the current stream waits for that gather (a no-op on CPU).

The implementations stay in their own modules and are looked up here: the kernels
through ``dispatch.kernel`` (on CPU ``cpu_head.py``, pure torch with value-dependent
shortcuts; on CUDA the Triton kernels when Triton imports, else the capturable
references of ``reference.py``; ``path`` picks explicitly: ``"auto"`` (per device),
``"torch"``, ``"triton"``), the side stream of the asynchronous gather in
``side_stream.py`` (why its order holds through Inductor: ``async_gather.py``), the
Inductor lowering of the head ops in ``inductor_head.py`` (which imports this module).

The registered schemas are flat (``torch.library`` ops take tensors, not tuples);
call them through the wrappers at the end of this module, which take a
:class:`~microspec_compile.kernels.state.VocabState`::

    observe(state, weight, tokens, pin=False)
    sparse_topk(hidden, state, bias, k, normalize)
    sparse_full(hidden, state, bias, vocab_size, normalize)
    observe_start(state, weight, tokens, pin=False)
    observe_wait(hidden, tokens, state)
"""
from __future__ import annotations

import functools
import hashlib
from typing import Optional

import torch

from .dispatch import kernel, kernels_for
from .reference import NORMALIZE_MODES
from .side_stream import gather_stream
from .state import VocabState

_LIB = "microspec"
_LIBRARY = torch.library.Library(_LIB, "DEF")
# The ops this module defines, as ``torch.ops.microspec.<name>``.
OPS = ("observe", "sparse_topk", "sparse_full", "observe_start", "observe_wait")
_STATE = ("rows", "ids", "member", "last_seen", "count", "step")


@functools.cache
def schema_digest() -> str:
    """A digest of every ``microspec::`` op's schema (16 hex digits).

    Inductor's generated code calls the ops with their argument names, and its on-disk
    caches do not key on custom ops' schemas: after a schema change (an argument renamed)
    a graph cached by the older package fails to run ("Unknown keyword argument").
    ``graph.compile_graph`` adds this digest to the cache key, so that never happens.
    """
    schemas = "\n".join(str(getattr(torch.ops.microspec, name).default._schema) for name in OPS)
    return hashlib.sha256(schemas.encode()).hexdigest()[:16]


def _op(name: str, mutates_args: tuple[str, ...] = ()):
    """Define ``microspec::<name>`` from the decorated function's annotations, run by it.

    Why not ``torch.library.custom_op``: its Python autograd and view-tracking layers ran on
    every call (about 25 us of host time per head call, more than the CPU kernel itself,
    ``bench/bench_host_overhead.py``), for ops that are never differentiated. Defined
    here, the dispatcher calls the function directly, on every device and in every
    compiled graph; the schema (mutated arguments included) is the one ``custom_op``
    would infer, and each op's fake is registered beside it.
    """
    def define(fn):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        IMPLEMENTATIONS[name] = fn
        _LIBRARY.impl(name, lambda *args: IMPLEMENTATIONS[name](*args),
                      "CompositeExplicitAutograd")
        return fn
    return define


def _fake(name: str):
    """Register the decorated function as the fake (meta) implementation of ``name``."""
    def register(fn):
        FAKES[name] = fn
        return torch.library.register_fake(f"{_LIB}::{name}", lib=_LIBRARY)(fn)
    return register


#: op name -> the function the dispatcher runs for it (looked up on each call, so that a
#: test may wrap one: ``tests/test_device_guards.py``)
IMPLEMENTATIONS: dict = {}
#: op name -> its fake (meta) implementation
FAKES: dict = {}


def check_tokens(tokens: torch.Tensor, vocab_size: int, host_check: bool = True) -> None:
    """Raise ValueError unless ``tokens`` is an integer tensor whose ids are in ``[0, vocab_size)``.

    The range is checked on the host only when ``host_check`` and the ids are on the host
    already (the CPU kernels: a read costs nothing there). Elsewhere it would be a host
    sync per call (and illegal in CUDA-graph capture), so it is made device-side instead:
    every kernel ignores ids outside the range (``reference.observe_reference``,
    ``triton_observe``). User input is checked once per request, off the hot path: the
    decoding loops check the prompt's ids on the host (``spec.verify.check_request``).
    """
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"token ids must be an integer tensor, got dtype {tokens.dtype}")
    if host_check and tokens.numel() and tokens.device.type == "cpu":
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")


def host_reads(device: torch.device, path: str) -> bool:
    """Whether the ops may read tensor values on the host: only the CPU kernels, where a
    read costs nothing (``dispatch.kernels_for``). The capturable references and the
    Triton kernels never do, on any device: the same code runs on CUDA."""
    return kernels_for(device, path) == "cpu"


def _observed(tokens: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor,
              path: str) -> torch.Tensor:
    """The observe ops' ``tokens``, checked (``check_tokens``) and on the state's device."""
    check_tokens(tokens, weight.shape[0], host_reads(rows.device, path))
    if tokens.device != rows.device:
        tokens = tokens.to(rows.device, non_blocking=True)
    return tokens


@_op("observe", mutates_args=_STATE)
def observe_op(
    rows: torch.Tensor,
    ids: torch.Tensor,
    member: torch.Tensor,
    last_seen: torch.Tensor,
    count: torch.Tensor,
    step: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    pin: bool = False,
    path: str = "auto",
) -> None:
    """Add unseen ``tokens`` to the vocabulary state in place (see ``observe_reference``)."""
    state = VocabState(rows, ids, member, last_seen, count, step)
    kernel("observe", rows.device, path)(state, weight, _observed(tokens, weight, rows, path), pin)


@_fake("observe")
def _(rows, ids, member, last_seen, count, step, weight, tokens, pin=False, path="auto"):
    return None


def _check_head_args(hidden: torch.Tensor, rows: torch.Tensor, normalize: str) -> None:
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if hidden.dim() < 1 or hidden.shape[-1] != rows.shape[1]:
        raise ValueError(
            f"hidden must be [..., {rows.shape[1]}] to match the head, got {list(hidden.shape)}"
        )
    if hidden.dtype != rows.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} does not match the head dtype {rows.dtype}")
    if hidden.device != rows.device:
        raise ValueError(f"hidden is on {hidden.device} but the head state is on {rows.device}")


def _check_not_empty(count: torch.Tensor, path: str) -> None:
    # An all-masked row would give NaN probabilities downstream (and NaN
    # comparisons can accept wrong draft tokens), so an empty vocabulary is an error:
    # raised on the host by the CPU kernels, asserted on the device elsewhere (no sync).
    if host_reads(count.device, path):
        if int(count) == 0:
            raise ValueError(_EMPTY)
    else:
        torch._assert_async(count[0] > 0, _EMPTY)


_EMPTY = (
    "the microspec active vocabulary is empty: pin ids (pinned_ids=[eos_id]) or observe "
    "token ids before calling the head"
)


@_op("sparse_topk", mutates_args=())
def sparse_topk_op(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    k: int,
    normalize: str,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the active rows. Returns ``(values [N, k], token_ids [N, k] int64)``."""
    _check_head_args(hidden, rows, normalize)
    if not 1 <= k <= rows.shape[0] - 1:
        raise ValueError(f"k must be in [1, capacity={rows.shape[0] - 1}], got {k}")
    _check_not_empty(count, path)
    run = kernel("sparse_topk", hidden.device, path)
    if hidden.dim() == 2:  # the draft's usual [N, H]: no reshapes on the hot path
        return run(hidden, rows, ids, count, bias, k, normalize)
    values, token_ids = run(hidden.reshape(-1, hidden.shape[-1]), rows, ids, count, bias, k,
                            normalize)
    lead = hidden.shape[:-1]
    return values.reshape(*lead, k), token_ids.reshape(*lead, k)


@_fake("sparse_topk")
def _(hidden, rows, ids, count, bias, k, normalize, path="auto"):
    shape = (*hidden.shape[:-1], k)
    return hidden.new_empty(shape), hidden.new_empty(shape, dtype=torch.int64)


@_op("sparse_full", mutates_args=())
def sparse_full_op(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
    bias: Optional[torch.Tensor],
    vocab_size: int,
    normalize: str,
    path: str = "auto",
) -> torch.Tensor:
    """Full-vocabulary output ``[N, vocab_size]``; inactive entries -inf (0 for softmax)."""
    _check_head_args(hidden, rows, normalize)
    _check_not_empty(count, path)
    run = kernel("sparse_full", hidden.device, path)
    if hidden.dim() == 2:
        return run(hidden, rows, ids, count, bias, vocab_size, normalize)
    out = run(hidden.reshape(-1, hidden.shape[-1]), rows, ids, count, bias, vocab_size,
              normalize)
    return out.reshape(*hidden.shape[:-1], vocab_size)


@_fake("sparse_full")
def _(hidden, rows, ids, count, bias, vocab_size, normalize, path="auto"):
    return hidden.new_empty((*hidden.shape[:-1], vocab_size))


@_op("observe_start", mutates_args=_STATE)
def observe_start_op(
    rows: torch.Tensor,
    ids: torch.Tensor,
    member: torch.Tensor,
    last_seen: torch.Tensor,
    count: torch.Tensor,
    step: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    pin: bool = False,
    path: str = "auto",
) -> None:
    """Start adding unseen ``tokens`` to the state: on CUDA on the side stream, else now.

    Same arguments and final state as ``microspec::observe``; on CUDA the state may be
    read only after ``microspec::observe_wait`` (``side_stream.GatherStream``).
    """
    tokens = _observed(tokens, weight, rows, path)
    state = VocabState(rows, ids, member, last_seen, count, step)
    run = kernel("observe", rows.device, path)
    if rows.device.type != "cuda":
        run(state, weight, tokens, pin)
        return
    gather_stream(state).start(lambda: run(state, weight, tokens, pin), tokens, weight)


@_fake("observe_start")
def _(rows, ids, member, last_seen, count, step, weight, tokens, pin=False, path="auto"):
    return None


@_op("observe_wait", mutates_args=("rows", "ids", "count"))
def observe_wait_op(
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    rows: torch.Tensor,
    ids: torch.Tensor,
    count: torch.Tensor,
) -> None:
    """Join the gather: the current stream waits on the vocabulary's ``join`` event.

    ``hidden`` (the head's input) and ``tokens`` (the gathered ids) are only read, to
    order the wait after the layers and keep ``tokens`` alive; ``rows`` / ``ids`` /
    ``count`` are declared mutated (not written) so that the head is ordered after
    it (``async_gather.py``).  A no-op on CPU.
    """
    if count.device.type == "cuda":
        gather_stream(VocabState(rows, ids, None, None, count, None)).wait()


@_fake("observe_wait")
def _(hidden, tokens, rows, ids, count):
    return None


# ------------------------------------------------------------------ VocabState wrappers

def observe(state: VocabState, weight: torch.Tensor, tokens: torch.Tensor, pin: bool = False,
            path: str = "auto") -> None:
    """``microspec::observe`` on a state: add unseen ``tokens`` (any shape) in place.

    Parameters
    ----------
    state : VocabState
    weight : [V, H] the full head weight (rows of new tokens are gathered from it)
    tokens : integer tensor of any shape, ids in ``[0, V)``
    pin : mark the tokens as never evicted
    path : ``"auto"``, ``"torch"`` or ``"triton"`` (``kernels/dispatch.py``)
    """
    torch.ops.microspec.observe(*state, weight, tokens, pin, path)


def sparse_topk(hidden: torch.Tensor, state: VocabState, bias: Optional[torch.Tensor], k: int,
                normalize: str = "none", path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``microspec::sparse_topk`` on a state: ``hidden [..., H]`` -> ``(values, ids) [..., k]``."""
    return torch.ops.microspec.sparse_topk(hidden, state.rows, state.ids, state.count, bias, k,
                                           normalize, path)


def sparse_full(hidden: torch.Tensor, state: VocabState, bias: Optional[torch.Tensor],
                vocab_size: int, normalize: str = "none", path: str = "auto") -> torch.Tensor:
    """``microspec::sparse_full`` on a state: ``hidden [..., H]`` -> ``[..., vocab_size]``."""
    return torch.ops.microspec.sparse_full(hidden, state.rows, state.ids, state.count, bias,
                                           vocab_size, normalize, path)


def observe_start(state: VocabState, weight: torch.Tensor, tokens: torch.Tensor,
                  pin: bool = False, path: str = "auto") -> None:
    """``microspec::observe_start`` on a state (arguments as :func:`observe`)."""
    torch.ops.microspec.observe_start(*state, weight, tokens, pin, path)


def observe_wait(hidden: torch.Tensor, tokens: torch.Tensor, state: VocabState) -> None:
    """``microspec::observe_wait`` on a state: ``hidden [..., H]`` is the head's input."""
    torch.ops.microspec.observe_wait(hidden, tokens, state.rows, state.ids, state.count)
