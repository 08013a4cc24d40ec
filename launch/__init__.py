"""The runtime every recipe shares: config, ranks and devices, backends, the train loop, tracking."""
