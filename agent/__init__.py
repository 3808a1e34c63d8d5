"""Device agent: a Flower SuperNode that trains its subnet and serves inference at its current budget."""
