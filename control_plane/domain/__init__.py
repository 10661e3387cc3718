"""The control plane's pure core: job lifecycle, leases and fencing. No I/O, no clock, no gRPC."""
