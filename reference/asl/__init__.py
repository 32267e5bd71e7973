"""The method: ASL and its baselines on top of the model (parameters, scoring, selection, the criterion, the engine protocol, prefill methods, greedy generation)."""
