"""dress.fleet protocol packages (generated code lives in the leaf packages)."""
