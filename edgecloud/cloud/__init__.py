"""edgecloud.cloud."""
