"""Serving bpdq checkpoints with inference engines (vLLM: bpdq.serving.vllm)."""
