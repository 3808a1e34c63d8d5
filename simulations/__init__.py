"""Fleets of virtual devices on one machine, on Flower's simulation engine (Ray)."""
