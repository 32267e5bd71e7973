"""The oracle tools: traces, the tolerance policy and rule 0, golden bundles and the checker, the mutation catalogue, the pytest plugin."""
