"""How the real services start: locally (this package) and on clusters (configs beside it)."""
