"""Crafted-file tests: each hostile input is read in a bounded child process."""
