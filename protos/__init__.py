"""gRPC control-plane protocol (dress.fleet.v1): .proto source and the generated Python."""
