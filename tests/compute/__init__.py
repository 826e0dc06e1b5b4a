"""Compute contexts: SUBMIT_3D streams driven through the front-end simulator against the
real back-end process (our back-end only)."""
