"""The built-in toy video world (world.py), its exact judge (judge.py) and the tiny Wan teacher trained on it
(teacher.py)."""
