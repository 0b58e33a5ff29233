"""Prompt formats, byte for byte as in the references.

Multi-document QA, closed-book QA and KV retrieval follow nelson-liu/lost-in-the-middle
(`prompting.py` and its tests; also documented in the data folder's README.md). MMLU
follows lm-evaluation-harness's default `mmlu` task (description line, "A. ..." choices,
"Answer:", continuation " X", few-shot examples joined by a blank line).
"""

from __future__ import annotations

QA_INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search "
                  "results (some of which might be irrelevant).")
KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
LETTERS = "ABCD"


def format_document(index: int, title: str, text: str) -> str:
    """`index` is 1-based, as the model sees it."""
    return f"Document [{index}](Title: {title}) {text}"


def qa_prompt(question: str, documents: list[tuple[str, str]]) -> str:
    """documents: (title, text) pairs in the order shown to the model."""
    results = "\n".join(format_document(i + 1, t, x) for i, (t, x) in enumerate(documents))
    return f"{QA_INSTRUCTION}\n\n{results}\n\nQuestion: {question}\nAnswer:"


def closedbook_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def kv_prompt(records: list[tuple[str, str]], key: str) -> str:
    lines = []
    for i, (k, v) in enumerate(records):
        start = "{" if i == 0 else " "
        end = ",\n" if i != len(records) - 1 else "}"
        lines.append(f'{start}"{k}": "{v}"{end}')
    return f'{KV_INSTRUCTION}\n\nJSON data:\n{"".join(lines)}\n\nKey: "{key}"\nCorresponding value:'


def mmlu_question(question: str, choices: list[str]) -> str:
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}{opts}\nAnswer:"


def mmlu_prompt(subject: str, question: str, choices: list[str],
                shots: list[tuple[str, list[str], int]] = ()) -> str:
    """0- or k-shot MMLU prompt; the answer is scored as the continuation " A".." D"."""
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    demo = "".join(f"{mmlu_question(q, c)} {LETTERS[a]}\n\n" for q, c, a in shots)
    return head + demo + mmlu_question(question, choices)


def render(tokenizer, prompt: str, chat: bool) -> str:
    """The exact text the model reads. With `chat`, the tokenizer's own chat template (one
    user turn, generation prompt added); SmolLM2's template adds its default system prompt,
    and that is kept: it is how the model is meant to be prompted."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
