"""PyTorch twins of tinygrad_llm's ops and model, used by the tests, the benchmarks and graders."""
