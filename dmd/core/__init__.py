"""Foundations every layer uses: typed config, atomic I/O, video files, flow-matching maths, random draws, process lifetime, progress."""
