"""`ossq serve`: an OpenAI-compatible server over the engine (docs/serve.md).

Nothing is imported here, so `import ossq` works without FastAPI; `ossq.serve.app` needs the `serve`
extra (`pip install 'ossq[serve]'`).
"""
