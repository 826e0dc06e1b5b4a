"""vgpu-backend host-side tests (unit tests, the front-end simulator, integration tests)."""
