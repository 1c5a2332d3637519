"""EAGLE heads from a local directory: this project's layout and SafeAILab's EAGLE-1/2
release layout (``config.json`` + ``pytorch_model.bin`` or ``model.safetensors``)."""
from __future__ import annotations

import json

import pytest
import torch
from test_eagle_tree import tiny_target

from microspec_compile.heads import EagleHead


def _release(head: EagleHead, directory, *, safetensors: bool, extra: dict | None = None):
    """Write ``head`` as SafeAILab's EAGLE-1/2 releases are laid out."""
    state = {("layers.0." + k[len("layer."):] if k.startswith("layer.") else k): v.clone()
             for k, v in head.trainable_state().items()}
    state["embed_tokens.weight"] = head.embed_tokens.weight.detach().clone()  # some ship it
    state["layers.0.input_layernorm.weight"] = torch.ones(head.config.hidden_size)
    state.update(extra or {})
    c = head.config
    config = {"architectures": ["LlamaForCausalLM"], "bias": c.fc_bias,
              "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
              "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
              "rms_norm_eps": c.rms_norm_eps, "num_hidden_layers": 1}
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")


def _same_predictions(a: EagleHead, b: EagleHead) -> bool:
    torch.manual_seed(3)
    ids = torch.randint(0, a.config.vocab_size, (1, 5))
    features = torch.randn(1, 5, a.config.hidden_size)
    positions = torch.arange(5)[None]
    with torch.no_grad():
        return torch.allclose(a.hidden(ids, features, positions), b.hidden(ids, features, positions))


@pytest.mark.parametrize("safetensors", [False, True])
def test_an_eagle_release_loads_as_the_head_that_wrote_it(tmp_path, safetensors):
    target = tiny_target()
    torch.manual_seed(1)
    head = EagleHead.for_target(target)
    for p in head.parameters_to_train():
        torch.nn.init.normal_(p, std=0.05)
    _release(head, tmp_path / "release", safetensors=safetensors)
    loaded = EagleHead.load(tmp_path / "release", target)
    assert loaded.embed_tokens is target.get_input_embeddings()  # the target's, not the file's
    assert _same_predictions(head.eval(), loaded)
    head.save(tmp_path / "ours")  # this project's layout still loads (fp16 on disk)
    assert EagleHead.load(tmp_path / "ours", target).config == head.config


def test_a_release_for_another_model_or_of_another_layout_is_refused(tmp_path):
    target = tiny_target()
    head = EagleHead.for_target(target)
    _release(head, tmp_path / "eagle3", safetensors=True, extra={"d2t": torch.zeros(4)})
    with pytest.raises(ValueError, match="'d2t'.*EAGLE-3"):
        EagleHead.load(tmp_path / "eagle3", target)
    bias = {"layers.0.self_attn.q_proj.bias": torch.zeros(head.config.hidden_size)}
    _release(head, tmp_path / "qwen", safetensors=False, extra=bias)
    with pytest.raises(ValueError, match="hold tensors this head does not have.*q_proj.bias"):
        EagleHead.load(tmp_path / "qwen", target)
    _release(head, tmp_path / "wide", safetensors=False)
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    (tmp_path / "wide" / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    with pytest.raises(ValueError, match="hidden_size=128 but the target has"):
        EagleHead.load(tmp_path / "wide", target)
    with pytest.raises(FileNotFoundError, match="neither eagle_config.json .* nor config.json"):
        EagleHead.load(tmp_path, target)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no EAGLE head weights"):
        EagleHead.load(tmp_path / "empty", target)
