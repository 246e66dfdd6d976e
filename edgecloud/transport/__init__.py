"""edgecloud.transport."""
