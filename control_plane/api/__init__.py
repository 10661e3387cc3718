"""gRPC servicers: thin adapters from protobuf to the job queue and back."""
