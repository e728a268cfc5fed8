"""The remote backend: edge and cloud as separate processes over a real network (gRPC, TLS, a token).
The cloud serves and runs the one scheduler (`launch.run`); each edge dials it (`launch.serve_edge`).
Only `config` is imported here: grpcio (the `remote` extra) is needed once a run uses the network."""
