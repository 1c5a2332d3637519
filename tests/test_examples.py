"""``examples/own_model.py`` on a tiny model, tokenizer and head saved as a user's would be."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
WORDS = [f"w{i}" for i in range(1020)]


def _save_model_and_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w0{% endif %}")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return tokenizer


def test_own_model_example_decodes_the_targets_greedy_answer(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from microspec_compile.heads import EagleHead

    tokenizer = _save_model_and_tokenizer(tmp_path / "model")
    target = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    EagleHead.for_target(target).save(tmp_path / "head")
    spec = importlib.util.spec_from_file_location("own_model", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    prompt = "w5 w17 w17 w300 w5 w17"
    answer = example.main(["--model", str(tmp_path / "model"), "--head", str(tmp_path / "head"),
                           "--prompt", prompt, "--max-new-tokens", "12"])
    ids = example.prompt_ids(tokenizer, prompt)
    with torch.no_grad():
        expected = target.generate(ids, max_new_tokens=12, do_sample=False,
                                   attention_mask=torch.ones_like(ids))
    assert answer == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    printed = capsys.readouterr().out
    assert answer in printed and "tokens per verification" in printed
