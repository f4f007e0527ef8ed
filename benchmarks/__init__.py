"""Side-by-side benchmarks: ours against what a user would otherwise run. Never part of the tests."""
