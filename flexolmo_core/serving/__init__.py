"""`flexolmo serve`: an OpenAI-compatible server over a merged model with per-request expert choice.

- config.py  the `serve` section of params.yaml (limits, batching, audit log)
- policy.py  owners' access policies: API keys (hashed) -> principals and groups -> experts they may use
- engine.py  batched greedy decoding where each sequence has its own expert mask (one forward per step)
- audit.py   one JSON line per request, appended and flushed to disk; `flexolmo usage` summarises it
- app.py     the FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /healthz, hot swaps"""
