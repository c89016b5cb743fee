"""`wren web`: a Gradio chat page over a local model or any OpenAI-compatible server (docs/web.md).

Gradio and openai are imported only by the modules that need them, never by `import wren`.
"""
