"""Stage 1, recipe and config: YAML recipe → validated, defaulted Recipe (recipe.py), the typed-YAML machinery (schema.py) and the require: gates (gates.py)."""
