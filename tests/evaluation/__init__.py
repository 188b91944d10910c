"""Tests of ssprompt.evaluation."""
