"""The chat page: `build_app(backend)` returns the Gradio Blocks, `launch` serves it.

The conversation lives in a per-browser `gr.State` as a list of turns (question, reasoning,
answer, stats line, error); the chatbot shows a rendering of it. Keeping the two apart means the
model is sent answers only, never the reasoning, the stats line or an error message.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from wren.web.backends import Backend, Message, Progress, Settings, Stats

Turn = dict[str, str]
Update = tuple[list[dict[str, Any]], list[Turn]]


def _turn(question: str) -> Turn:
    return {"user": question, "reasoning": "", "answer": "", "stats": "", "error": ""}


def render(turns: list[Turn], streaming: bool = False) -> list[dict[str, Any]]:
    """Chatbot messages for the turns: reasoning as a collapsed thought, stats under the answer."""
    shown: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        shown.append({"role": "user", "content": turn["user"]})
        live = streaming and index == len(turns) - 1
        if turn["reasoning"]:
            status = "pending" if live and not turn["answer"] else "done"
            shown.append(
                {
                    "role": "assistant",
                    "content": turn["reasoning"],
                    "metadata": {"title": "Reasoning", "status": status},
                }
            )
        if turn["error"]:
            shown.append({"role": "assistant", "content": f"**Error:** {turn['error']}"})
        elif turn["answer"] or turn["stats"] or live:
            stats = f"\n\n*{turn['stats']}*" if turn["stats"] else ""
            shown.append({"role": "assistant", "content": (turn["answer"] or "…") + stats})
    return shown


def conversation(system: str | None, turns: list[Turn]) -> list[Message]:
    """What the model is sent: the system prompt, then questions and answers (no failed turns)."""
    # A textbox inside a closed accordion may send None.
    system = (system or "").strip()
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    for turn in turns[:-1]:
        if not turn["error"]:
            messages += [
                {"role": "user", "content": turn["user"]},
                {"role": "assistant", "content": turn["answer"]},
            ]
    messages.append({"role": "user", "content": turns[-1]["user"]})
    return messages


def _answer(backend: Backend, system: str | None, turns: list[Turn], settings: Settings) -> Iterator[Update]:
    """Stream the last turn's answer into it, yielding the page's (chatbot, turns) as it grows."""
    turn = turns[-1]
    yield render(turns, streaming=True), turns
    try:
        for item in backend.stream(conversation(system, turns), settings):
            if isinstance(item, Progress):
                turn["reasoning"], turn["answer"] = item.reasoning, item.answer
            elif isinstance(item, Stats):
                turn["stats"] = item.line()
            yield render(turns, streaming=True), turns
    except Exception as exc:  # any failure becomes a message in the chat, never a stuck spinner
        turn["error"] = str(exc) or type(exc).__name__
    yield render(turns), turns


def build_app(backend: Backend) -> gr.Blocks:
    """The chat page over `backend`. Element ids (wren-*) are the tests' selectors."""

    # Each action first commits the conversation (a quick step), then streams the answer in a
    # second event: Stop cancels only that one, and the question is already safe in the state.
    def ask(text: str, turns: list[Turn]) -> tuple:
        if not text.strip():
            return render(turns), turns, text
        turns = [*turns, _turn(text)]
        return render(turns, streaming=True), turns, ""

    def redo(turns: list[Turn]) -> Update:
        if turns:
            turns = [*turns[:-1], _turn(turns[-1]["user"])]
        return render(turns, streaming=True), turns

    def reply(system: str, turns: list[Turn], *knobs: float) -> Iterator[Update]:
        if not turns or turns[-1] != _turn(turns[-1]["user"]):  # nothing new was asked
            yield render(turns), turns
            return
        yield from _answer(backend, system, turns, Settings(*knobs))

    def undo(turns: list[Turn]) -> tuple:
        if not turns:
            return render(turns), turns, gr.update()
        # The question goes back into the box, to edit and send again.
        return render(turns[:-1]), turns[:-1], turns[-1]["user"]

    def stopped(turns: list[Turn]) -> Update:
        if turns and not (turns[-1]["stats"] or turns[-1]["error"]):
            turns = [*turns[:-1], {**turns[-1], "stats": "stopped"}]
        return render(turns), turns

    with gr.Blocks(title="Wren chat") as app:
        gr.Markdown(f"### Wren chat · {backend.description}")
        turns = gr.State([])
        chatbot = gr.Chatbot(elem_id="wren-chat", height=480, label="Chat")
        with gr.Row():
            text = gr.Textbox(
                elem_id="wren-input", placeholder="Message", show_label=False, scale=5, lines=1, max_lines=8
            )
            send_button = gr.Button("Send", elem_id="wren-send", variant="primary", scale=1)
        with gr.Row():
            stop_button = gr.Button("Stop", elem_id="wren-stop")
            regen_button = gr.Button("Regenerate", elem_id="wren-regenerate")
            undo_button = gr.Button("Undo", elem_id="wren-undo")
            clear_button = gr.Button("Clear", elem_id="wren-clear")
        with gr.Accordion("Settings", open=False, elem_id="wren-settings"):
            system = gr.Textbox(label="System prompt", elem_id="wren-system", lines=2)
            defaults = Settings()
            knobs = [
                gr.Slider(
                    0.0,
                    2.0,
                    value=defaults.temperature,
                    step=0.05,
                    label="Temperature (0: greedy)",
                    elem_id="wren-temperature",
                ),
                gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top p", elem_id="wren-top-p"),
                gr.Slider(
                    1,
                    4096,
                    value=defaults.max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    elem_id="wren-max-tokens",
                ),
                gr.Slider(
                    0.8,
                    2.0,
                    value=defaults.repetition_penalty,
                    step=0.05,
                    label="Repetition penalty",
                    elem_id="wren-repetition",
                ),
            ]

        answering = [system, turns, *knobs]
        running = [
            send_button.click(ask, [text, turns], [chatbot, turns, text]).then(
                reply, answering, [chatbot, turns]
            ),
            text.submit(ask, [text, turns], [chatbot, turns, text]).then(reply, answering, [chatbot, turns]),
            regen_button.click(redo, [turns], [chatbot, turns]).then(reply, answering, [chatbot, turns]),
        ]
        # Marked only once the cancel has gone through, so the reply's last state is what is marked.
        stop_button.click(None, None, None, cancels=running).then(stopped, [turns], [chatbot, turns])
        undo_button.click(undo, [turns], [chatbot, turns, text], cancels=running)
        clear_button.click(lambda: ([], []), None, [chatbot, turns], cancels=running)
        chatbot.clear(lambda: [], None, [turns], cancels=running)  # the chatbot's own bin icon
    return app


def launch(backend: Backend, host: str, port: int) -> None:
    """Serve the page until interrupted. Requests from many tabs share the engine's batch."""
    build_app(backend).queue(default_concurrency_limit=8).launch(
        server_name=host, server_port=port, show_error=True
    )
