"""`posellm-edge serve` and `loadtest`: the pose service on Ray Serve (extra `serve`) and its HTTP load generator."""
