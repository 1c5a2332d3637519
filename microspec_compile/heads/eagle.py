"""An EAGLE-1/2 draft head for a Hugging Face Llama-architecture target.

The head predicts the target's *next feature* (its last hidden state after the
final norm, what its LM head reads) from the current feature and the next token:

    pair i = (feature f_i, token x_{i+1})  ->  hidden h_i ~ f_{i+1}
    h_i = layer(fc(cat(embed(x_{i+1}), f_i)))          (fc: Linear(2H, H))

``layer`` is one Llama decoder layer without its input norm, and there is no final
norm: ``h_i`` goes straight into the **target's own LM head** (shared, never copied)
to score token ``x_{i+2}``.  The embedding is the target's too.  Only ``fc`` and
``layer`` are trained and saved (safetensors + a small JSON config); the shared
embedding and head are attached at load time from the target.

Position ids: pair ``i`` sits at position ``i`` (the position of its feature), so a
draft KV cache row ``i`` stands for target position ``i``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..hf import cache_kwargs, check_cache_grew
from .checkpoints import OWN_CONFIG, OWN_WEIGHTS, checkpoint_layout, eagle_config, eagle_state

__all__ = ["EagleConfig", "EagleHead", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE, WEIGHTS_FILE = OWN_CONFIG, OWN_WEIGHTS
# the layer's shape read from an EAGLE-1/2 release's config.json (the rest is the target's)
LAYER_FIELDS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE head; must match its target (checked by :meth:`EagleHead.attach`).

    Parameters
    ----------
    hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim :
        the decoder layer's shape (the target's by default)
    vocab_size : the target's vocabulary (rows of the shared embedding / LM head)
    rms_norm_eps, rope_theta, max_position_embeddings : as the target's config
    fc_bias : whether ``fc`` has a bias (EAGLE's has one)
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    fc_bias: bool = True

    @classmethod
    def from_target(cls, target_config) -> "EagleConfig":
        """The head shape for a HF Llama-style target config (one decoder layer of it)."""
        c = target_config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_theta", None)
        if rope is None:  # transformers 5 keeps it in rope_parameters, per layer type for
            # models that interleave attention kinds (Gemma 3: the global layers' is taken)
            params = getattr(c, "rope_parameters", None) or {}
            params = params.get("full_attention", params)
            rope = params.get("rope_theta", 10000.0)
        return cls(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                   num_attention_heads=heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   vocab_size=c.vocab_size, rms_norm_eps=c.rms_norm_eps, rope_theta=float(rope),
                   max_position_embeddings=c.max_position_embeddings)

    def llama_config(self):
        """A one-layer ``LlamaConfig`` for the decoder layer and rotary embedding."""
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                          num_attention_heads=self.num_attention_heads,
                          num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                          num_hidden_layers=1, vocab_size=self.vocab_size,
                          rms_norm_eps=self.rms_norm_eps,
                          max_position_embeddings=self.max_position_embeddings,
                          rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        cfg._attn_implementation = "sdpa"
        return cfg


class EagleHead(nn.Module):
    """EAGLE-1/2 draft head: ``fc`` + one decoder layer, scored by the target's head.

    Parameters
    ----------
    config : EagleConfig
    embed_tokens : the target's token embedding ``[V, H]`` (shared, frozen)
    lm_head : the target's LM head ``Linear(H, V)`` (shared, frozen)
    """

    def __init__(self, config: EagleConfig, embed_tokens: nn.Module, lm_head: nn.Module):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        self.config = config
        llama = config.llama_config()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=config.fc_bias)
        self.layer = LlamaDecoderLayer(llama, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # EAGLE drops it: fc's output goes in as is
        self.rotary_emb = LlamaRotaryEmbedding(llama)
        self.embed_tokens = embed_tokens
        self.lm_head = lm_head
        self._check_shared()

    @classmethod
    def for_target(cls, target: nn.Module, config: EagleConfig | None = None) -> "EagleHead":
        """A freshly initialised head sharing ``target``'s embedding and LM head, in its
        LM head's dtype and on its device."""
        config = config or EagleConfig.from_target(target.config)
        head = cls(config, target.get_input_embeddings(), target.get_output_embeddings())
        weight = target.get_output_embeddings().weight
        return head.to_dtype(weight.dtype, weight.device)

    def to_dtype(self, dtype: torch.dtype, device: torch.device | str | None = None) -> "EagleHead":
        """Cast the head's own modules only (``Module.to`` would cast the shared target's),
        and move them to ``device`` when given (the shared modules' device)."""
        for module in (self.fc, self.layer, self.rotary_emb):
            module.to(device=device, dtype=dtype)
        return self

    def _check_shared(self) -> None:
        v, h = self.config.vocab_size, self.config.hidden_size
        for name in ("embed_tokens", "lm_head"):
            weight = getattr(getattr(self, name), "weight", None)
            if weight is None or tuple(weight.shape) != (v, h):
                got = None if weight is None else list(weight.shape)
                raise ValueError(f"the target's {name} has weight {got}, but this EAGLE head was "
                                 f"made for a target with vocabulary {v} and hidden size {h}")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The head's own tensors (``fc`` and ``layer``), without the shared ones."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("fc.", "layer."))}

    @property
    def attention_config(self):
        """The ``LlamaConfig`` the head's attention reads (its attention implementation)."""
        return self.layer.self_attn.config

    def parameters_to_train(self) -> list[nn.Parameter]:
        return [*self.fc.parameters(), *self.layer.parameters()]

    # -- forward ---------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, features: torch.Tensor,
               position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache=None) -> torch.Tensor:
        """Predicted next features for pairs ``(features[:, i], input_ids[:, i])``.

        Parameters
        ----------
        input_ids : [B, T] int64, the token *after* each feature
        features : [B, T, H], the target's (or the head's own) features
        position_ids : [B, T] int64
        attention_mask : [B, 1, T, past + T] additive float or bool (True: attend) mask, or
            None for causal
        cache : a HF ``DynamicCache`` (layer 0) or None

        Returns
        -------
        [B, T, H] predicted features (what the LM head scores)
        """
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if features.shape[:-1] != input_ids.shape or features.shape[-1] != self.config.hidden_size:
            raise ValueError(f"features {list(features.shape)} do not pair with input_ids "
                             f"{list(input_ids.shape)} (hidden size {self.config.hidden_size})")
        embeds = self.embed_tokens(input_ids).to(features.dtype)
        x = self.fc(torch.cat([embeds, features], dim=-1))
        rope = self.rotary_emb(x, position_ids=position_ids)
        if cache is None:
            return self.layer(x, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, position_embeddings=rope)
        cached = cache.get_seq_length()
        out = self.layer(x, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, position_embeddings=rope, **cache_kwargs(self.layer, cache))
        check_cache_grew(cache, cached, input_ids.shape[1], "the EAGLE head's layer")
        return out

    def rollout_hidden(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                       position_ids: torch.Tensor, cache) -> torch.Tensor:
        """One step deeper on the head's own predictions, as a depth-1 tree node drafts.

        After ``hidden(input_ids, features, position_ids, cache=cache)`` over pairs
        ``0..L-1`` has filled ``cache``, pair ``i >= 1`` runs again with the head's own
        prediction of its feature, ``hidden[:, i - 1]``, in place of ``f_i``; like a tree
        node it sees the cached pairs before it and itself (EAGLE-3's training-time test).

        Parameters
        ----------
        input_ids, position_ids : [B, L] as given to :meth:`hidden`
        hidden : [B, L, H] what :meth:`hidden` returned
        cache : the ``DynamicCache`` that call filled (exactly ``L`` rows)

        Returns
        -------
        [B, L - 1, H] predictions of ``f_{i+1}`` for pairs ``1..L-1``
        """
        length = input_ids.shape[1]
        if cache.get_seq_length() != length or hidden.shape[1] != length or length < 2:
            raise ValueError(f"rollout_hidden needs the cache of one hidden() call over the same "
                             f"{length} >= 2 pairs, got {cache.get_seq_length()} cached rows and "
                             f"hidden {list(hidden.shape)}")
        dev = hidden.device
        allowed = torch.cat([torch.ones(length - 1, length, dtype=torch.bool, device=dev).tril(),
                             torch.eye(length - 1, dtype=torch.bool, device=dev)], 1)
        return self.hidden(input_ids[:, 1:], hidden[:, :-1], position_ids[:, 1:],
                           allowed[None, None], cache)

    def forward(self, input_ids, features, position_ids, attention_mask=None, cache=None):
        """``(hidden [B, T, H], logits [B, T, V])``: the head's features and their scores."""
        hidden = self.hidden(input_ids, features, position_ids, attention_mask, cache)
        return hidden, self.lm_head(hidden)

    # -- save / load -----------------------------------------------------------
    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write ``eagle_head.safetensors`` (fp16) and ``eagle_config.json`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.float16).contiguous()
                   for k, v in self.trainable_state().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        record = {"eagle": dataclasses.asdict(self.config), "metadata": metadata or {}}
        (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, target: nn.Module,
             dtype: torch.dtype | None = None) -> "EagleHead":
        """Load a saved head and attach it to ``target``'s embedding and LM head: this
        project's layout or an EAGLE-1/2 release (``heads.checkpoints``).

        Raises
        ------
        FileNotFoundError : the directory lacks the weights or the config
        ValueError : the head was made for a target of another shape
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        expected = EagleConfig.from_target(target.config)
        if checkpoint_layout(directory) == "eagle":
            record = eagle_config(directory)
            config = dataclasses.replace(expected, fc_bias=bool(record.get("bias", True)),
                                         **{k: record[k] for k in LAYER_FIELDS if k in record})
            state = eagle_state(directory)
        else:
            if not (directory / WEIGHTS_FILE).is_file():
                raise FileNotFoundError(f"no EAGLE head at {directory}: {WEIGHTS_FILE} is "
                                        "missing (train one with `microspec train-eagle`)")
            record = json.loads((directory / CONFIG_FILE).read_text())["eagle"]
            config = EagleConfig(**record)
            state = load_file(str(directory / WEIGHTS_FILE))
        for field in ("hidden_size", "vocab_size", "head_dim"):
            if field in record and record[field] != getattr(expected, field):
                raise ValueError(f"the EAGLE head at {directory} has {field}={record[field]} but the "
                                 f"target has {getattr(expected, field)}: it was trained for "
                                 "another model")
        head = cls(config, target.get_input_embeddings(), target.get_output_embeddings())
        dtype = dtype or target.get_output_embeddings().weight.dtype
        state = {k: v.to(dtype) for k, v in state.items()}
        missing = set(head.trainable_state()) - set(state)
        if missing:
            raise ValueError(f"the EAGLE weights at {directory} lack {sorted(missing)[:4]}")
        unexpected = set(state) - set(head.trainable_state())
        if unexpected:  # e.g. attention biases (Qwen-based releases): this head has none
            raise ValueError(f"the EAGLE weights at {directory} hold tensors this head does "
                             f"not have: {sorted(unexpected)[:4]}")
        head.to_dtype(dtype, target.get_output_embeddings().weight.device).load_state_dict(
            state, strict=False)
        return head.eval()
