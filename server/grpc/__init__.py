"""The gRPC front: a thin servicer over the data plane."""
