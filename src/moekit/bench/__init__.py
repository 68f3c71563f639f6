"""Benchmarks behind ``moekit bench``."""
