"""A stand-in for the Hugging Face Hub's HTTP API, for tests that must not reach the internet."""
