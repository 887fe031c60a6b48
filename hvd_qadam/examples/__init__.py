"""Small real tasks used by the demo, the tests and the studies."""
