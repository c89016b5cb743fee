"""`wren serve`: open the engine on its own thread, build the application around it and run it
under uvicorn."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from wren.errors import WrenError
from wren.infer.engine import Engine

logger = logging.getLogger("wren.serve")

# Requests in flight (waiting + running) per batch slot before new ones get 429.
DEFAULT_QUEUE_PER_SLOT = 8


def require_dependencies() -> None:
    """Fail before a slow model load when the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise WrenError(
            f"wren serve needs FastAPI and uvicorn ({exc}); pip install 'wrenlm[serve]'"
        ) from None


def serve(
    load_engine: Callable[[], Engine],
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_concurrency: int | None = None,
    log_level: str = "info",
) -> None:
    """Serve the engine `load_engine` opens until interrupted (blocks); it is called on the
    engine thread (see wren.serve.driver). `model` is where it came from: the default served
    name (as vLLM does) and the `root` of /v1/models."""
    require_dependencies()
    import uvicorn

    from wren.serve.app import create_app
    from wren.serve.driver import EngineDriver
    from wren.serve.state import ServerState

    if max_concurrency is not None and max_concurrency < 1:
        raise WrenError(f"--max-concurrency must be >= 1, got {max_concurrency}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    driver = EngineDriver(load_engine)
    engine = driver.launch()
    if max_concurrency is None:
        max_concurrency = DEFAULT_QUEUE_PER_SLOT * engine.max_batch_size
    driver.max_pending = max_concurrency
    state = ServerState(driver, served_model_name or str(model), str(model))
    if not api_key and not _is_loopback(host):
        logger.warning("listening on %s without an API key: anyone who can reach it can use the model", host)
    logger.info(
        "serving %s as %r on http://%s:%d (%d slots, context %d tokens, at most %d requests in flight%s)",
        model,
        state.model_name,
        host,
        port,
        engine.max_batch_size,
        engine.max_seq_len,
        max_concurrency,
        ", API key required" if api_key else "",
    )
    uvicorn.run(
        create_app(state, api_key),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # each generating request logs its own line (wren.serve)
        timeout_graceful_shutdown=5,
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
