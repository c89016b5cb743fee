"""LangChain models over Wren's in-process engine: `ChatWren` (a chat model) and `WrenLLM` (text in,
text out). Extra `langchain`; langchain-core is imported here only.

    from wren.integrations.langchain import ChatWren
    chat = ChatWren(model="runs/sft/final", temperature=0.7, max_tokens=256)
    chat.invoke("What is 3 plus 4?").content

Both load the model once (or take a ready `engine=`) and share it between threads, so `batch`
runs its prompts in one continuous batch. Sampling fields use OpenAI's names; `stop` passed to a
call is added to the instance's stop strings. Usage (prompt and completion tokens) is reported as
LangChain's `usage_metadata`; `<think>` reasoning goes to `additional_kwargs["reasoning_content"]`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.llms import LLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import ConfigDict, Field, PrivateAttr

from wren.errors import WrenError
from wren.infer.engine import Engine
from wren.infer.request import Result
from wren.infer.sampling import SamplingParams
from wren.infer.shared import SharedEngine
from wren.infer.thinking import ThinkingStream, split_thinking

_ROLES = {"human": "user", "ai": "assistant", "system": "system"}


class _WrenModel:
    """What both LangChain classes share: the fields, the engine, the sampling parameters."""

    model: str | None = Field(default=None, description="model directory or hub id")
    engine: Any = Field(default=None, exclude=True, description="a ready wren Engine to use instead")
    backend: str = "auto"
    dtype: str = "auto"
    device: str | None = None
    adapter: str | None = None
    max_batch_size: int = 16
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 256
    seed: int | None = None
    stop: list[str] | None = None

    _shared: SharedEngine = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        if self.engine is None:
            if self.model is None:
                raise WrenError("give model= (a model directory or hub id) or engine= (a wren Engine)")
            from wren.infer.load import load_engine

            self.engine = load_engine(
                self.model,
                backend=self.backend,  # type: ignore[arg-type]
                dtype=self.dtype,
                device=self.device,
                adapter=self.adapter,
                max_batch_size=self.max_batch_size,
            )
        if not isinstance(self.engine, Engine):
            raise WrenError(f"engine= must be a wren.infer.engine.Engine, got {type(self.engine).__name__}")
        self._shared = SharedEngine(self.engine)

    def _params(self, stop: list[str] | None, **overrides: Any) -> SamplingParams:
        values = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "max_new_tokens": self.max_tokens,
            "seed": self.seed,
            "stop": [*(self.stop or []), *(stop or [])],
        }
        return SamplingParams.from_dict(values).with_overrides(overrides)

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}


def _usage(result: Result) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


def to_chat_messages(messages: list[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the chat template takes them; tool messages are not supported."""
    converted = []
    for message in messages:
        role = _ROLES.get(message.type)
        if role is None:
            raise WrenError(f"{type(message).__name__} is not supported; use system, human and AI messages")
        content = message.content
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p if isinstance(p, str) else p.get("text", "") for p in content)
        converted.append({"role": role, "content": content})
    return converted


class ChatWren(_WrenModel, BaseChatModel):
    """A LangChain chat model running a Wren (or any Hugging Face) model in this process."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "wren-chat"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        result = self._shared.complete(to_chat_messages(messages), self._params(stop, **kwargs))
        thinking, answer = split_thinking(result.text)
        message = AIMessage(
            content=answer,
            additional_kwargs={"reasoning_content": thinking} if thinking else {},
            usage_metadata=_usage(result),
            response_metadata={"finish_reason": result.finish_reason, "model_name": self.model or "wren"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        split = ThinkingStream()
        for event in self._shared.run(to_chat_messages(messages), self._params(stop, **kwargs)):
            if isinstance(event, Result):
                thinking, answer = split.finish()
                metadata = {"finish_reason": event.finish_reason, "model_name": self.model or "wren"}
                yield self._chunk(thinking, answer, run_manager, _usage(event), metadata)
            else:
                thinking, answer = split.feed(event)
                if thinking or answer:
                    yield self._chunk(thinking, answer, run_manager)

    @staticmethod
    def _chunk(
        thinking: str,
        answer: str,
        run_manager: CallbackManagerForLLMRun | None,
        usage: UsageMetadata | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ChatGenerationChunk:
        message = AIMessageChunk(
            content=answer,
            additional_kwargs={"reasoning_content": thinking} if thinking else {},
            usage_metadata=usage,
            response_metadata=metadata or {},
        )
        chunk = ChatGenerationChunk(message=message)
        if run_manager and answer:
            run_manager.on_llm_new_token(answer, chunk=chunk)
        return chunk


class WrenLLM(_WrenModel, LLM):
    """A LangChain text-completion model (prompt string in, continuation out) over a Wren engine."""

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    @property
    def _llm_type(self) -> str:
        return "wren"

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return self._shared.complete(prompt, self._params(stop, **kwargs)).text

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        for event in self._shared.run(prompt, self._params(stop, **kwargs)):
            if isinstance(event, str):
                chunk = GenerationChunk(text=event)
                if run_manager:
                    run_manager.on_llm_new_token(event, chunk=chunk)
                yield chunk
