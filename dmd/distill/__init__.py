"""The DMD algorithm: the σ schedule, the student's rollout, the three roles, the losses (DMD, regression, GAN, consistency)."""
