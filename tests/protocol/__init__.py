"""Tests of the sans-IO ``protocol`` package."""
