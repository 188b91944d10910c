"""Tests of ssprompt.engine."""
