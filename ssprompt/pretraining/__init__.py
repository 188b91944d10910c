"""Pretraining of the embedded SFM on composed scenes, and its model card."""
