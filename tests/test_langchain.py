"""LangChain over the in-process engine: ChatWren and WrenLLM with langchain-core (invoke, stream,
batch, a prompt | model | parser chain, stop, usage, reasoning) and LangChain's standard tests."""

import pytest
from helpers import build_chat_model
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from wren.errors import WrenError
from wren.infer.load import load_engine
from wren.infer.sampling import SamplingParams
from wren.integrations.langchain import ChatWren, WrenLLM

QUESTION = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return build_chat_model(tmp_path_factory.mktemp("langchain"))


@pytest.fixture(scope="module")
def chat(chat_model):
    return ChatWren(model=str(chat_model), temperature=0)


def test_invoke_matches_the_engine(chat, chat_model):
    reply = chat.invoke(QUESTION)
    expected = load_engine(chat_model).generate([[{"role": "user", "content": QUESTION}]], GREEDY)[0]
    assert reply.content == expected.text and " plus " in reply.content
    assert reply.usage_metadata == {
        "input_tokens": expected.prompt_tokens,
        "output_tokens": expected.completion_tokens,
        "total_tokens": expected.prompt_tokens + expected.completion_tokens,
    }
    assert reply.response_metadata["finish_reason"] == "stop"


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=256)


def test_stream_is_token_by_token(chat):
    chunks = list(chat.stream(QUESTION))
    assert sum(bool(c.content) for c in chunks) >= 4
    assert "".join(c.content for c in chunks) == chat.invoke(QUESTION).content
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata["output_tokens"] == chat.invoke(QUESTION).usage_metadata["output_tokens"]


def test_batch_equals_one_at_a_time(chat):
    questions = [f"What is {a} plus {b}?" for a, b in [(1, 2), (5, 5), (9, 0), (4, 4)]]
    assert [m.content for m in chat.batch(questions)] == [chat.invoke(q).content for q in questions]


def test_messages_system_and_history(chat):
    history = [SystemMessage("You add."), HumanMessage("What is 1 plus 1?"), AIMessage("1 plus 1 is 2.")]
    longer = chat.invoke([*history, HumanMessage(QUESTION)])
    assert longer.usage_metadata["input_tokens"] > chat.invoke(QUESTION).usage_metadata["input_tokens"]
    parts = chat.invoke([HumanMessage(content=[{"type": "text", "text": QUESTION}])])
    assert parts.content == chat.invoke(QUESTION).content
    with pytest.raises(WrenError, match="ToolMessage is not supported"):
        chat.invoke([ToolMessage("42", tool_call_id="1")])


def test_stop_and_call_time_settings(chat):
    full = chat.invoke(QUESTION).content
    assert " is " in full
    assert chat.invoke(QUESTION, stop=[" is"]).content == full.split(" is")[0]
    cut = chat.invoke(QUESTION, max_tokens=2)
    assert cut.usage_metadata["output_tokens"] == 2 and cut.response_metadata["finish_reason"] == "length"


def test_a_prompt_model_parser_chain(chat):
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You add numbers."), ("human", "What is {a} plus {b}?")]
    )
    chain = prompt | chat | StrOutputParser()
    answer = chain.invoke({"a": 3, "b": 4})
    assert isinstance(answer, str) and " plus " in answer
    assert answer == chat.invoke(prompt.invoke({"a": 3, "b": 4})).content


def test_text_completion_llm(chat):
    llm = WrenLLM(engine=chat.engine, temperature=0, max_tokens=8)
    text = llm.invoke("What is 2 plus")
    assert text and "".join(llm.stream("What is 2 plus")) == text
    assert llm.batch(["What is 2 plus", "7 plus 7 is"])[0] == text


def test_reasoning_goes_apart_from_the_answer(tmp_path):
    chat = ChatWren(model=str(build_chat_model(tmp_path, thinking=True)), temperature=0)
    reply = chat.invoke(QUESTION)
    assert reply.additional_kwargs["reasoning_content"] == "adding the numbers"
    assert " plus " in reply.content and "think" not in reply.content
    chunks = list(chat.stream(QUESTION))
    assert "".join(c.additional_kwargs.get("reasoning_content", "") for c in chunks) == "adding the numbers"
    assert "".join(c.content for c in chunks) == reply.content


def test_a_model_or_an_engine_is_required():
    with pytest.raises(WrenError, match="give model="):
        ChatWren()


# -- LangChain's standard test suites --------------------------------------------------------------


class _OnTheTinyModel:
    """What LangChain's standard suites need: the class, and how to build one on the test model."""

    @property
    def chat_model_class(self):
        return ChatWren

    @pytest.fixture(autouse=True)
    def _model_dir(self, chat_model):
        type(self).model_dir = str(chat_model)

    @property
    def chat_model_params(self):
        return {"model": self.model_dir, "temperature": 0}


class TestChatWrenStandardUnit(_OnTheTinyModel, ChatModelUnitTests):
    pass


class TestChatWrenStandardIntegration(_OnTheTinyModel, ChatModelIntegrationTests):
    @property
    def has_tool_calling(self):
        return False

    @property
    def has_structured_output(self):
        return False
