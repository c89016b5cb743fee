"""What every route needs: the engine driver, the served model's name, the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from wren.serve.driver import EngineDriver
from wren.serve.errors import APIError
from wren.serve.metrics import ServerMetrics


@dataclass
class ServerState:
    driver: EngineDriver
    model_name: str  # the id clients send as `model`
    model_root: str  # where the weights came from (`root` in /v1/models)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self) -> Any:
        return self.driver.engine.tokenizer

    @property
    def context(self) -> int:
        return self.driver.engine.max_seq_len

    def check_model(self, name: str | None) -> None:
        """A request may leave `model` out; naming another model is a 404, as OpenAI answers."""
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "wren",
            "root": self.model_root,
            "max_model_len": self.context,
        }
