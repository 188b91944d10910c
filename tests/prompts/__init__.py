"""Tests of ssprompt.prompts."""
