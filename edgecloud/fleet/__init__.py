"""edgecloud.fleet."""
