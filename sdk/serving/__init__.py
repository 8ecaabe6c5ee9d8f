"""`edgeq serve`, an app of its own (the `serve` extra): the scheduler and service (`server`) and the FastAPI routes
(`api`). `edgeq.serve()` is the public entry; this package does not take that name."""
