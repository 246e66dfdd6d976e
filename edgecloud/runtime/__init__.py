"""edgecloud.runtime."""
