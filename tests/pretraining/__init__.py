"""Tests of ssprompt.pretraining."""
