"""Tests of ssprompt.data."""
