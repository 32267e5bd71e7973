"""The evaluation suite: offline long-context tasks and prompts, the resumable runner, the report."""
