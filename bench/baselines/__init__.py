"""Reference servers implementing hitl's HTTP/SSE API, used as benchmark baselines."""
