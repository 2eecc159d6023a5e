"""The OIP gRPC service: generated stubs and the proto <-> types codec."""
