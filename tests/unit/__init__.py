"""Fast unit tests of pure functions: no model is built or loaded, each test well under a second."""
