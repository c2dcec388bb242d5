"""The R1-style system prompt and the chat messages a teacher is sampled with.

The DeepSeek-V3 report samples R1 under a system prompt designed to draw out reflection and
verification; the text below is this project's version, configurable per run.
"""

from __future__ import annotations

from .prompt_sets import PromptRecord

R1_SYSTEM_PROMPT = (
    "You are a meticulous problem solver. Think the problem through step by step between <think> and "
    "</think> before answering. While you think, reflect on your work: verify each intermediate result, "
    "look for mistakes, and when you find one, say so and correct it. Check the final result against the "
    "question before you commit to it. After </think>, state the answer concisely."
)

TASK_INSTRUCTIONS = {
    "math": "Please reason step by step, and put your final answer within \\boxed{}.",
    "code": "Write a complete Python solution in a single ```python code block.",
}


def build_messages(record: PromptRecord, system_prompt: str | None = R1_SYSTEM_PROMPT) -> list[dict]:
    """[system (optional), user: problem + the task's answer-format instruction]."""
    instruction = TASK_INSTRUCTIONS.get(record.task or "", "")
    user = record.problem.rstrip() + ("\n" + instruction if instruction else "")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": user}]
