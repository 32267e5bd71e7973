"""File formats and loading: safetensors, Hugging Face checkpoints, GGUF import, tokenizers and chat templates, fetching aliases, the tiny committed checkpoints, atomic writes."""
