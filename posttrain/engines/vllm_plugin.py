"""vLLM's plugin hook (entry point `vllm.general_plugins`): registers our weight-sync receivers
in every vLLM process. Kept apart from vllm_receivers.py so that merely listing the plugin
imports nothing heavy, and a broken vLLM install cannot stop vLLM from starting."""


def register() -> None:
    try:
        from .vllm_receivers import register as register_receivers
    except ImportError:  # a vLLM without the weight-transfer API: nothing to register
        return
    register_receivers()
