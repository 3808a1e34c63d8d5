"""dress.fleet.v1: control_plane.proto and its generated Python (protos/generate.py regenerates it)."""
