"""Host settings: CLI flags with their environment twins (LEMONADE_HOST, LEMONADE_PORT, ...)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class HostSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(13305, ge=0, le=65535)
    log_level: str = "info"
    ctx_size: int | None = Field(None, ge=16, description="context length; default: the model's")
    max_loaded_models: int = Field(1, ge=1)
    api_key: str | None = None
    plugins: list[str] = Field(default_factory=list)
    default_model: str = "SmolLM2-135M-Instruct-CPU"
    max_queue: int = Field(16, ge=1, description="requests waiting for the engine before 503")
    parallel: int = Field(4, ge=1, description="generations a model serves at once, their steps taking turns "
                          "(llama-server's --parallel slots); 1 serves one request after another")
    schedule: Literal["fcfs", "shortest_first"] = Field("fcfs", description="who runs next when a place frees: "
                                                         "first come first served, or the shortest prompt")
    prefill_chunk_budget: int = Field(128, ge=16, description="most prompt tokens one step runs while other "
                                      "sequences of the model are running (their next token waits for it)")
    batch_decode: bool = Field(True, description="the next token of the sequences decoding at once runs in one "
                               "session run (continuous batching); off: each takes a step of its own")
    request_timeout_s: float = Field(600.0, gt=0)
    max_body_mb: float = Field(8.0, gt=0, description="largest request body, MiB: a full 128K-token context of "
                               "JSON-escaped text fits (413 request_too_large above it, refused before parsing)")
    plugin_options: dict[str, dict[str, object]] = Field(default_factory=dict, description="per plugin, the "
                                                         "options passed through to it as given")
    config_path: Path | None = None
    extra_models_dir: Path | None = Field(None, description="a folder of GGUF files served as extra.NAME "
                                          "(Lemonade's extra_models_dir), converted at their first load")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
