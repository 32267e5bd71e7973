"""The model: a Llama/Mistral/Qwen2 transformer in NumPy (config, weights and their tensor names, rope, attention, the layers). Imports NumPy and reference.errors only."""
