"""Routing: choosing the node that serves each request."""
