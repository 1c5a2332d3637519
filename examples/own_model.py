"""Your own Hugging Face model and EAGLE head, decoded with a microspec draft head.

    python examples/own_model.py --model path/to/hf-model --head path/to/eagle-head \\
        --prompt "Explain speculative decoding in two sentences."

``--model``: a local Hugging Face causal LM directory (Llama- or Gemma-3-style) with its
tokenizer; ``--head``: an EAGLE head for it, trained with ``microspec train-eagle`` or an
EAGLE-1/2 release in SafeAILab's layout.  Nothing is downloaded.  Prints the answer and the
decoding's statistics; the answer is the target's own greedy output.
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from microspec_compile.heads import EagleHead
from microspec_compile.spec import DecoderConfig, prepare


def prompt_ids(tokenizer, text: str) -> torch.Tensor:
    """``[1, P]`` ids of a user message: the chat template where the tokenizer has one."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--head", required=True, help="EAGLE head directory for that model")
    parser.add_argument("--prompt", default="Explain speculative decoding in two sentences.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    target = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                  dtype=torch.float32).eval()
    head = EagleHead.load(args.head, target)  # refuses a head made for another model
    eos = tokenizer.eos_token_id
    decoder = prepare(target, head, DecoderConfig(pinned_ids=() if eos is None else eos))
    ids = prompt_ids(tokenizer, args.prompt)
    with torch.inference_mode():
        out, stats = decoder.generate(ids, args.max_new_tokens, eos_token_id=eos)
    answer = tokenizer.decode(out[ids.shape[1]:], skip_special_tokens=True)
    print(answer)
    print(f"{stats.new_tokens} new tokens in {stats.total_time:.2f} s "
          f"({stats.new_tokens / stats.total_time:.1f} tokens/s), "
          f"{stats.tokens_per_verification():.2f} tokens per verification, "
          f"{decoder.vocab.size} tokens in the draft's active vocabulary")
    return answer


if __name__ == "__main__":
    main()
