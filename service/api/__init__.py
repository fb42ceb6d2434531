"""The HTTP API of ``tureen serve``: dependencies, schemas, routes."""
