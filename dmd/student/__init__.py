"""The trained student: sampling it and exporting it as a plain diffusers pipeline."""
