"""PEFT's own generic tuner tests, vendored unmodified from the peft 0.21.2 sdist (see NOTICE). Not collected directly."""
