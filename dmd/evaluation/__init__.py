"""The evaluate stage: the teacher reference, metrics and the report."""
