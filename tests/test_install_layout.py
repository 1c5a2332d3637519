"""The repository's top-level folders never shadow an installed package, and the loops pass
Hugging Face models their KV cache under the keyword they take, or fail loudly.

``kernels/`` and ``passes/`` are the sources of ``microspec_compile.kernels`` and
``microspec_compile.passes`` (linked into the package folder). They hold no ``__init__.py``:
a folder without one is a namespace portion, and a regular package anywhere on ``sys.path``
wins over it, so running Python at the repository root (``python -m pytest``, ``python -c``)
cannot hide Hugging Face's ``kernels`` package (which transformers imports) or any other.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run_at_root(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("folder", ["kernels", "passes"])
def test_top_level_folders_are_not_regular_packages(folder):
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), (
        f"{folder}/__init__.py would make {folder}/ shadow any installed package named {folder}")
    linked = ROOT / "microspec_compile" / folder
    assert linked.is_symlink() and linked.resolve() == (ROOT / folder).resolve()


def test_an_installed_package_wins_over_the_folders_at_the_repository_root(tmp_path):
    for name in ("kernels", "passes"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    done = _run_at_root("import kernels, passes; print(kernels.WHO, '|', passes.WHO)",
                        str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "installed kernels | installed passes"


def test_transformers_imports_at_the_repository_root():
    done = _run_at_root("import transformers; from transformers import LlamaConfig; "
                        "import microspec_compile.kernels.ops, microspec_compile.passes.match_head; "
                        "print(microspec_compile.kernels.ops.__name__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "microspec_compile.kernels.ops"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval()


def test_cache_keyword_is_read_from_the_signature():
    from microspec_compile.hf import cache_keyword

    model = _tiny_llama()
    for module in (model, model.model, model.model.layers[0]):
        keyword = cache_keyword(module)
        assert keyword in ("cache", "past_key_values")
    assert cache_keyword(model) == cache_keyword(model.model)


def test_a_forward_that_ignores_its_cache_fails_loudly(monkeypatch):
    """transformers 5.17 swallowed ``cache=`` in ``**kwargs``: the same situation, made here
    with a keyword no release knows, must stop the loop instead of attending wrongly."""
    from microspec_compile.spec import verify
    from microspec_compile.spec.tree import causal_mask

    model = _tiny_llama()
    cache, _ = verify.target_session(model)
    ids = torch.tensor([[1, 2, 3]])
    features, _ = verify.target_forward(model, ids, cache, torch.arange(3).view(1, -1),
                                        causal_mask(0, 3, torch.float32))
    assert cache.get_seq_length() == 3 and features.shape == (3, 32)
    monkeypatch.setattr(verify, "cache_kwargs", lambda module, cache: {"ignored_cache": cache})
    with pytest.raises(RuntimeError, match="did not write the cache|must match the size"):
        verify.target_forward(model, torch.tensor([[4, 5]]), cache,
                              torch.arange(3, 5).view(1, -1), causal_mask(3, 2, torch.float32))


def test_a_mask_longer_than_the_keys_is_an_error():
    from microspec_compile.spec.attention import gqa_sdpa_attention

    class Layer(torch.nn.Module):
        num_key_value_groups = 2
        training = False

    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    with pytest.raises(RuntimeError, match="mask covers 5 keys but the layer has 3"):
        gqa_sdpa_attention(Layer(), q, kv, kv, torch.zeros(1, 1, 3, 5))
