"""`wren serve`: an OpenAI-compatible HTTP API over the continuous-batching engine.

    app.py          routes, middleware, the engine thread's life
    schemas.py      request bodies (pydantic; also the OpenAPI schema)
    prompts.py      body -> prompt tokens, completion budget, sampling parameters
    driver.py       the engine thread <-> asyncio bridge, admission control
    exchange.py     one generating request: 429, disconnects, streaming cleanup, its log line
    chat.py         /v1/chat/completions and MiniMind's POST /
    completions.py  /v1/completions
    responses.py    OpenAI's response and chunk objects, SSE framing
    errors.py       OpenAI-shaped errors; 400 instead of FastAPI's 422
    auth.py         the API key check
    metrics.py      Prometheus text for /metrics
    server.py       open the model and run uvicorn

FastAPI and uvicorn (the `serve` extra) are imported by these modules, never by `import wren`.
"""
