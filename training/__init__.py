"""Training of the small PoseLLM shipped with posellm-edge: loop, config, objectives, samples, synthetic data."""
