"""The model: a Llama/Mistral/Qwen2/Qwen3/Phi-3 transformer in NumPy (config, weights and their tensor names, rope, attention, the layers). Imports NumPy and reference.errors only."""
