"""Load generation (locust, in its own process) and exact latency statistics."""
