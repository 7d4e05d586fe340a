"""Model definitions (composition of layers) and the architecture adapter table."""
