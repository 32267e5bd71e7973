"""The evaluation suite: offline long-context tasks (every prompt the project builds), the resumable runner, the report."""
