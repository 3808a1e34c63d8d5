"""Fleet coordinator: Flower ServerApp with the DRESS strategy, the device registry and the control plane."""
