"""The session stores: `base` (the shared types and the interface), then one module per backend."""
