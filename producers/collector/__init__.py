"""The HTTP collector: clients' events over HTTP, validated at the edge, into the raw topic."""
