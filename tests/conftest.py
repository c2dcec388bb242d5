"""Session-wide test setup.

TRITON_INTERPRET=1 runs our Triton kernels on CPU tensors under Triton's interpreter. Triton
reads it when it is first imported, and several test modules import libraries that import
Triton (vLLM, transformers), so it is set here, before any test module is collected. On CPU
nothing else launches Triton kernels (vLLM's CPU backend disables Triton).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The real data sets (GSM8K, MATH-500, HumanEval, HH-RLHF): $POSTTRAIN_SHARED_DATA, else
    ../shared/data beside the checkout. Tests that need them skip, saying so, where absent."""
    from data_recipes.prompt_sets import shared_data_dir

    path = shared_data_dir()
    if not (path / "humaneval.jsonl.gz").exists():
        pytest.skip(f"the shared data sets are not at {path} (set POSTTRAIN_SHARED_DATA to their directory)")
    return path


@pytest.fixture
def kernels():
    """Choose implementations for one test, `kernels(grouped_mm="loop", packed="always")`
    (posttrain/model/kernels/selection.py); the previous choice is restored after it."""
    import dataclasses

    from posttrain.model.kernels import selection

    before = selection.active()
    yield lambda **choices: selection.select(dataclasses.replace(selection.active(), **choices))
    selection.select(before)
