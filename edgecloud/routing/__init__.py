"""edgecloud.routing."""
