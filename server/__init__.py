"""The meshserve process: settings, the data plane, REST and gRPC fronts, runtimes."""
