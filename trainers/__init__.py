"""Functional, sharded trainer for converted models (see the trainer issue); importable on its own."""
