"""Merge methods: pure tensor functions with typed parameters, one module per family."""
