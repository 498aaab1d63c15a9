"""Code the tests share (imported explicitly; no test module imports another)."""
