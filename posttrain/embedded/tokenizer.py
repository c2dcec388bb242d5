"""Offline byte-level BPE tokenizer with DeepSeek-V3 special tokens and chat template.

The embedded default cannot download DeepSeek's 128k-token tokenizer, and a
tiny model should not carry a huge embedding table anyway.  So we train a
small byte-level BPE locally on text that looks like what the pipeline will
feed it (arithmetic problems from :mod:`posttrain.embedded.task` wrapped in
R1-style reasoning), but keep DeepSeek-V3's special-token strings and chat
format so every later stage (SFT masking, RL prompting, generation stop) is
written once against the real conventions.

Design choices, and why:

* Byte-level pre-tokenizer/decoder: any text round-trips, no ``<unk>``.
* Digits are split one per token before BPE (DeepSeek-V3 isolates digit
  groups too); a tiny model learns arithmetic far more easily when every
  number is spelled with the same ten symbols.
* No normalizer, so decoding is exact.
* Training is single-pass over a fixed generated corpus; the ``tokenizers``
  BPE trainer breaks ties deterministically, so the vocab and merges are a
  pure function of ``(vocab_size, seed)`` (the tests check this across
  processes).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .task import ArithmeticProblem, make_problems

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

SPECIAL_TOKENS = (BOS, EOS, PAD)
"""Control tokens stripped by ``skip_special_tokens``; they get ids 0, 1, 2 as in DeepSeek-V3."""

ADDED_TOKENS = (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE)
"""Atomic but non-special (DeepSeek marks these ``special: false``), so they survive decoding."""

CORPUS_PROBLEMS = 500
"""About 10 lines each: a few thousand lines keeps training well under a second."""

CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '" + USER + "' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('Unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"
)
"""DeepSeek-V3 layout: bos, system text, then ``<｜User｜>`` turns and
``<｜Assistant｜>`` turns closed by eos.  Unlike R1's template, earlier
reasoning is *not* stripped: SFT trains on whole traces.  The
``{% generation %}`` block marks assistant content + eos for loss masking."""

_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
_OPENERS = (
    "Let me work through this step by step.",
    "Okay, let me solve this carefully.",
    "Let me break this down.",
    "Alright, I need to compute this one operation at a time.",
    "Okay, so I need to find the value of this expression.",
    "Hmm, let me think about the order of operations first.",
    "I should handle the parentheses first, then multiplication, then addition and subtraction.",
)
_STEP_PREFIXES = ("First, ", "Then ", "Next, ", "Now ", "So ", "After that, ", "Therefore ", "")
_CHECKS = (
    "Wait, let me check that: {}. Yes, that is right.",
    "Let me verify: {}. Correct.",
    "Hmm, let me double-check {}. Good.",
    "Actually, wait. Let me recompute {} to be sure. Yes, that holds.",
    "Let me make sure I did not make a mistake here: {}. That looks correct.",
)
_INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}
_CLOSERS = (
    "So the answer is {}.",
    "Therefore, the final result is {}.",
    "I am confident the answer is {}.",
    "Putting it all together, we get {}.",
)


def _inverse_check(step: str) -> str | None:
    """Undo a step (``a op b = c`` -> ``c inv b = a``): the kind of backward
    verification R1 traces contain.  None when the inverse is undefined (b = 0)."""
    a, op, b, _, c = step.split()
    if op == "*" and int(b) == 0:
        return None
    return f"Let me verify by working backwards: {c} {_INVERSE[op]} {b} = {a}. Good."


def _sample_text(problem: ArithmeticProblem, rng: random.Random) -> str:
    """One chat-formatted R1-style sample, as the pipeline will render it."""
    lines = [rng.choice(_OPENERS)]
    for i, step in enumerate(problem.steps):
        lines.append(f"{rng.choice(_STEP_PREFIXES) if i else 'First, '}{step}.")
        roll = rng.random()
        if roll < 0.2:
            lines.append(rng.choice(_CHECKS).format(step))
        elif roll < 0.35 and (check := _inverse_check(step)):
            lines.append(check)
    lines.append(rng.choice(_CLOSERS).format(problem.answer))
    reasoning = "\n".join(lines)
    return (
        f"{BOS}{USER}{problem.question}\n{_PROMPT}{ASSISTANT}{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"
        f"The answer is \\boxed{{{problem.answer}}}.{EOS}"
    )


def _training_corpus(seed: int) -> Iterator[str]:
    """Pieces BPE will actually see: added tokens are matched before BPE at
    encode time, so they are split out here rather than wasting merges."""
    splitter = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + ADDED_TOKENS))
    rng = random.Random(seed)
    for problem in make_problems(CORPUS_PROBLEMS, seed=seed):
        for piece in splitter.split(_sample_text(problem, rng)):
            if piece:
                yield piece


def build_tokenizer(vocab_size: int = 1024, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the embedded tokenizer; same arguments give byte-identical vocab and merges.

    ``vocab_size`` is an upper bound: the narrow corpus runs out of useful
    merges at about 600 tokens, and the trainer stops there rather than
    inventing rare ones.  Size the model's embedding from ``len(tokenizer)``.
    """
    reserved = len(SPECIAL_TOKENS) + len(ADDED_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < reserved:
        raise ValueError(f"vocab_size must be >= {reserved} (bytes + control tokens), got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS + ADDED_TOKENS),  # ids 0..6 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_corpus(seed), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    # Set on the backend as well as via add_bos_token so tokenizer.json carries
    # it and transformers versions that ignore add_bos_token still prepend bos.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=True,  # like DeepSeek-V3: plain encodes start with bos
        add_eos_token=False,
        clean_up_tokenization_spaces=False,  # exact decoding
        chat_template=CHAT_TEMPLATE,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write a directory that ``AutoTokenizer.from_pretrained`` loads offline."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory
