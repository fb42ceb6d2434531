"""One router per resource: merges, plans, methods, health, metrics."""
