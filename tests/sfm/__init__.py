"""Tests of ssprompt.sfm."""
