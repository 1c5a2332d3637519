"""The EAGLE-1/2 training loop over cached features, resumable at any step.

Loss per answer position (EAGLE's recipe):

    h_i  = head(x_{i+1}, f_i + noise)              predicted feature of position i + 1
    loss = SmoothL1(h_i, f_{i+1}) + 0.1 * CE(softmax(W f_{i+1}), log_softmax(W h_i))

``W`` is the target's LM head (frozen, shared): the cross-entropy is soft, against
the target's own next-token distribution, over the full vocabulary.  Noise is
uniform, ``(u - 1/2) * noise * 512 / T`` as in EAGLE.  Pairs whose predicted
token ``x_{i+2}`` lies in the answer carry the loss.

With ``rollout_weight > 0`` the loss adds, with that weight, the same loss one
step deeper on the head's own predictions (EAGLE-3's training-time test,
``EagleHead.rollout_hidden``): ``h2_i = head(x_{i+1}, h_{i-1})`` against
``f_{i+1}``, which is what a depth-1 node of the draft tree computes.  Without
it the head only ever sees the target's (noised) features, while the tree reads
its own predictions from the second depth on.

With ``ce_vocab = N > 0`` the cross-entropy is taken over N vocabulary rows only: the
batch's own tokens (among them every greedy next token of regenerated answers), filled
up with the most frequent training tokens (``.soft_ce``; for vocabularies where the
full products dominate a step).

Checkpoints (head, optimiser, step, schedule) are written every ``save_every``
seconds to ``work_dir`` and atomically replaced, so a run killed at any moment
resumes from its last checkpoint with the same batch order (seeded per epoch).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ...heads import EagleHead
from .features import FeatureSet, atomic_save, frequent_ids
from .precision import bf16_is_faster
from .soft_ce import linear_soft_cross_entropy

__all__ = ["TrainConfig", "make_batches", "batch_tensors", "ce_rows", "eagle_loss", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (EAGLE's AdamW betas and clip; a higher lr for short runs)."""

    lr: float = 5e-4
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    warmup_steps: int = 100
    token_budget: int = 4096
    noise: float = 0.2
    ce_weight: float = 0.1
    seed: int = 0
    autocast: bool | None = None  # bf16 autocast; None: where bf16 is faster on this CPU
    save_every_s: float = 120.0
    rollout_weight: float = 0.0
    ce_vocab: int = 0  # rows of the cross-entropy (module docstring); 0: the full vocabulary

    def __post_init__(self):
        if not self.rollout_weight >= 0:
            raise ValueError(f"rollout_weight must be >= 0 (0: off), got {self.rollout_weight}")
        if self.ce_vocab < 0:
            raise ValueError(f"ce_vocab must be >= 0 rows (0: the full vocabulary), got "
                             f"{self.ce_vocab}")


def ce_rows(tokens: torch.Tensor, by_frequency: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` vocabulary ids: every id in ``tokens``, then ids of ``by_frequency`` (every
    id, most frequent first) up to ``count`` (module docstring)."""
    vocab = by_frequency.numel()
    if count > vocab:
        raise ValueError(f"ce_vocab {count} exceeds the vocabulary ({vocab})")
    taken = torch.zeros(vocab, dtype=torch.bool, device="cpu")
    taken[tokens.reshape(-1).cpu()] = True
    own = taken.nonzero().view(-1)
    if own.numel() >= count:
        return own[:count]
    rest = by_frequency[~taken[by_frequency]][: count - own.numel()]
    return torch.cat([own, rest])


def make_batches(lengths: torch.Tensor, token_budget: int, epoch: int, seed: int) -> list[list[int]]:
    """Length-bucketed batches of at most ``token_budget`` padded tokens, shuffled per epoch."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    jitter = torch.rand(len(lengths), generator=gen, device="cpu")  # shuffle in equal lengths
    order = sorted(range(len(lengths)), key=lambda s: (int(lengths[s]) // 32, float(jitter[s])))
    batches, batch, width = [], [], 0
    for s in order:
        w = max(width, int(lengths[s]))
        if batch and w * (len(batch) + 1) > token_budget:
            batches.append(batch)
            batch, w = [], int(lengths[s])
        batch.append(s)
        width = w
    if batch:
        batches.append(batch)
    perm = torch.randperm(len(batches), generator=gen, device="cpu").tolist()
    return [batches[k] for k in perm]


def batch_tensors(data: FeatureSet, batch: list[int], device=None):
    """Padded pair tensors of a batch, assembled on the host from the cached features and
    moved to ``device`` (None: left on the host).

    Returns
    -------
    tokens [B, L-1] int64 (x_{i+1}), inputs [B, L-1, H] (f_i), targets [B, L-1, H]
    (f_{i+1}), positions [B, L-1] int64, mask [B, L-1] bool (pairs carrying the loss)
    """
    seqs = [data.sequence(s) for s in batch]
    width = max(len(ids) for ids, _, _ in seqs)
    hidden = data.features.shape[1]
    ids = torch.zeros(len(seqs), width, dtype=torch.int64, device="cpu")
    feats = torch.zeros(len(seqs), width, hidden, device="cpu")
    mask = torch.zeros(len(seqs), width - 1, dtype=torch.bool, device="cpu")
    for row, (s_ids, s_feats, prompt_len) in enumerate(seqs):
        t = len(s_ids)
        ids[row, :t] = s_ids
        feats[row, :t] = s_feats.float()
        mask[row, max(prompt_len - 2, 0): t - 1] = True
    positions = torch.arange(width - 1, device="cpu").expand(len(seqs), -1)
    out = ids[:, 1:], feats[:, :-1], feats[:, 1:], positions, mask
    return out if device is None else tuple(t.to(device) for t in out)


def eagle_loss(head: EagleHead, tokens, inputs, targets, positions, mask, *,
               noise: float, ce_weight: float, generator=None, autocast: bool = True,
               rollout_weight: float = 0.0, ce_vocab_rows: torch.Tensor | None = None):
    """``(loss, top-1 agreement, rows)`` of one batch (see the module docstring);
    ``ce_vocab_rows``: the vocabulary rows of the cross-entropy (None: all)."""
    from transformers import DynamicCache

    if noise > 0:  # drawn where the generator lives (the same noise on every device)
        rng = generator.device if generator is not None else inputs.device
        u = torch.rand(inputs.shape, generator=generator, device=rng).to(inputs.device)
        inputs = inputs + (u - 0.5) * noise * 512 / inputs.shape[1]
    deeper = rollout_weight > 0 and tokens.shape[1] >= 2
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
        cache = DynamicCache(config=head.attention_config) if deeper else None
        hidden = head.hidden(tokens, inputs, positions, cache=cache)
        if deeper:
            rows = mask.clone()
            rows[:, 0] = False  # pair 0 has no prediction of its own feature
            deep_pred = head.rollout_hidden(tokens, hidden, positions, cache)[rows[:, 1:]]
    compute_dtype = torch.bfloat16 if autocast else torch.float32
    loss, agree = _feature_and_ce_loss(head, hidden[mask], targets[mask], ce_weight, compute_dtype,
                                       ce_vocab_rows)
    if deeper:
        deep_loss, _ = _feature_and_ce_loss(head, deep_pred, targets[rows], ce_weight,
                                            compute_dtype, ce_vocab_rows)
        loss = loss + rollout_weight * deep_loss
    return loss, agree, int(mask.sum())


def _feature_and_ce_loss(head: EagleHead, pred, true, ce_weight: float, compute_dtype, rows):
    """``(SmoothL1(pred, true) + ce_weight x soft CE of the LM head's scores of pred against
    the target's distribution softmax(head(true)), top-1 agreement)`` (:mod:`.soft_ce`)."""
    ce, agree = linear_soft_cross_entropy(pred, true, head.lm_head, compute_dtype=compute_dtype,
                                          rows=rows)
    feature_loss = F.smooth_l1_loss(pred.float(), true)
    return feature_loss + ce_weight * ce, int(agree) / pred.shape[0]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(head: EagleHead, data: FeatureSet, work_dir: str | Path, *, seconds: float,
          config: TrainConfig | None = None, steps: int | None = None, progress=None) -> dict:
    """Train ``head`` for ``seconds`` of compute (summed over resumed runs), or ``steps``.

    Without ``steps``, the step count of the cosine schedule is fixed once, from
    the speed of steps 10-30, and stored in the checkpoint, so a resumed run
    follows the same schedule.  Batches (per epoch) and input noise (per step) are
    seeded, so a resumed run continues exactly where the interrupted one stopped.
    ``progress(step, total, loss, agreement)`` is called per step.

    Returns
    -------
    dict: ``steps``, ``epochs`` (fractional), ``seconds``, ``tokens`` (loss rows seen),
    ``last_loss``, ``last_agreement`` (mean of the last 50 steps), ``autocast`` (as run)
    """
    config = config or TrainConfig()
    device = head.fc.weight.device  # batches are assembled on the host and moved there
    if config.autocast is None:  # bf16 is native on CUDA; a CPU measures it
        config = replace(config, autocast=bf16_is_faster() if device.type == "cpu"
                         else device.type == "cuda")
    torch.manual_seed(config.seed)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = work_dir / "checkpoint.pt"
    params = head.parameters_to_train()
    for p in head.lm_head.parameters():
        p.requires_grad_(False)
    for p in head.embed_tokens.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                            weight_decay=config.weight_decay)
    state = {"step": 0, "total_steps": steps, "elapsed": 0.0, "tokens": 0, "history": []}
    if ckpt_path.is_file():
        saved = torch.load(ckpt_path, weights_only=False)
        # fields added since the checkpoint was written count at their defaults
        saved_config = {**asdict(TrainConfig()), **saved["config"]}
        differ = sorted(k for k, v in asdict(config).items() if saved_config.get(k) != v)
        if differ:
            what = ", ".join(f"{k}: {saved_config.get(k)!r} there, {getattr(config, k)!r} here"
                             for k in differ)
            raise ValueError(f"the checkpoint at {ckpt_path} was made with another training "
                             f"configuration ({what}); use another work directory or delete it")
        head.load_state_dict(saved["head"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
    lengths = data.lengths()
    by_frequency = frequent_ids(data.ids, head.config.vocab_size) if config.ce_vocab else None

    def checkpoint() -> dict:
        return {"head": head.trainable_state(), "optimizer": opt.state_dict(), "state": state,
                "config": asdict(config)}

    head.train()
    last_save = time.perf_counter()
    epoch_batches: dict[int, list] = {}

    def batches(epoch: int) -> list:
        if epoch not in epoch_batches:
            epoch_batches[epoch] = make_batches(lengths, config.token_budget, epoch, config.seed)
        return epoch_batches[epoch]

    def locate(step: int) -> tuple[int, int]:
        """(epoch, batch index in it) of a global step: each epoch's shuffle packs the
        length buckets anew, so its batch count may differ from the first's."""
        epoch = 0
        while step >= len(batches(epoch)):
            step -= len(batches(epoch))
            epoch += 1
        return epoch, step

    while state["elapsed"] < seconds:
        if state["total_steps"] is not None and state["step"] >= state["total_steps"]:
            break
        epoch, index = locate(state["step"])
        t0 = time.perf_counter()
        total = state["total_steps"] or max(config.warmup_steps * 2, 1000)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(state["step"], total, config.warmup_steps)
        noise_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + state["step"])
        tensors = batch_tensors(data, batches(epoch)[index], device)
        vocab_rows = (None if by_frequency is None else
                      ce_rows(tensors[0], by_frequency, config.ce_vocab).to(device))
        loss, agree, rows = eagle_loss(head, *tensors, noise=config.noise,
                                       ce_weight=config.ce_weight, generator=noise_gen,
                                       autocast=config.autocast,
                                       rollout_weight=config.rollout_weight,
                                       ce_vocab_rows=vocab_rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        state["step"] += 1
        state["elapsed"] += time.perf_counter() - t0
        state["tokens"] += rows
        state["history"].append((loss.item(), agree))
        if state["step"] == 10:  # the first steps pay one-time kernel set-up
            state["elapsed_at_10"] = state["elapsed"]
        if state["total_steps"] is None and state["step"] == 30:
            per_step = (state["elapsed"] - state.get("elapsed_at_10", 0.0)) / 20
            state["total_steps"] = max(int(30 + (seconds - state["elapsed"]) / per_step), 31)
        if progress is not None:
            progress(state["step"], state["total_steps"], state["history"][-1][0], agree)
        if time.perf_counter() - last_save > config.save_every_s:
            atomic_save(checkpoint(), ckpt_path)
            last_save = time.perf_counter()
    atomic_save(checkpoint(), ckpt_path)
    head.eval()
    recent = state["history"][-50:] or [(float("nan"), float("nan"))]
    epoch, index = locate(state["step"])
    return {"steps": state["step"], "epochs": epoch + index / len(batches(epoch)),
            "seconds": state["elapsed"], "tokens": state["tokens"],
            "last_loss": sum(r[0] for r in recent) / len(recent),
            "last_agreement": sum(r[1] for r in recent) / len(recent),
            "autocast": config.autocast}
