"""The Wan I/O layer: loading diffusers' Wan classes at a precision, model identity, tiny and skeleton models of the real configs."""
