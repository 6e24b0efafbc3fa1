"""Experiment configs, one per published protocol and strategy family."""
