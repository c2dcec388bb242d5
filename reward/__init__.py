"""Rewards with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`.

    import reward
    math = reward.get("math")                 # math-verify, bounded in time
    code = reward.get("code")                 # sandboxed tests, fraction passed
    mix = reward.combine({"math": 1.0, "format": 0.1})

Completions may be strings or chat-message lists; None means "not applicable".
"""

from .code_reward import CodeResult, CodeReward
from .math_reward import MathResult, MathReward
from .registry import available, combine, get, register
from .sandbox import Sandbox, SandboxLimits, SandboxResult
from .shaping import CosineLength, LanguageConsistency, OverlongPenalty, RepetitionPenalty, ThinkFormat

register("math", MathReward)
register("code", CodeReward)
register("format", ThinkFormat)
register("overlong", OverlongPenalty)
register("repetition", RepetitionPenalty)
register("language", LanguageConsistency)
register("cosine", CosineLength)

__all__ = [
    "get", "register", "available", "combine", "MathReward", "MathResult", "CodeReward", "CodeResult",
    "Sandbox", "SandboxLimits", "SandboxResult", "ThinkFormat", "OverlongPenalty", "RepetitionPenalty",
    "LanguageConsistency", "CosineLength",
]
