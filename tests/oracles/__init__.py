"""Oracle tests: guidekit through its plan vs. independent numpy float64 implementations."""
