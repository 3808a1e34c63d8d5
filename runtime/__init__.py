"""Running our processes on Flower's engines: the Flower processes we start and supervise, the reaper that ends
them with us, and the fleet's TLS certificates. Knows nothing of the method or of the fleet's contracts."""
