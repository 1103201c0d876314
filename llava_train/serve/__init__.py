"""Talk to a trained model: a terminal chat, an OpenAI-compatible server with request batching, a web page.

- ``generator``: a loaded model that validates conversations and generates batches, streaming text;
- ``engine``: the background worker that batches concurrent requests;
- ``schema``: OpenAI request / response shapes, data-URL images, error bodies;
- ``app``: the FastAPI app (``create_app``) and ``BackgroundServer``;
- ``chat``: the terminal chat session; ``config``: the Hydra schemas of launch/chat.py and serve.py.

FastAPI and uvicorn come with the ``serve`` extra (``pip install -e ".[serve]"``); import ``app`` /
``schema`` only when serving.
"""
