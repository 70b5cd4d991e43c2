"""dmd-pipeline: distil a flow-matching text-to-video teacher into a few-step student with DMD."""

__version__ = "0.1.0"
