"""loraplex as a Ray Serve application: many engine replicas behind one gRPC endpoint and
one OpenAI-compatible HTTP endpoint.

    SDK / grpcurl ──gRPC──> Ray's gRPC proxy ──> Ingress (ingress.py): the loraplex.v1 methods,
    openai ────────HTTP──> Ray's HTTP proxy ──>  and __call__ (http.py: by the body's model)
                                                   │  handle.options(multiplexed_model_id=<adapter id>)
                                                   ▼
                                 Replica × N (replica.py): one Engine + its engine loop each,
                                 @serve.multiplexed over adapter ids, health from readiness
    shared adapter root ── registry.py (id → path, read lazily by whichever replica the router picks)

`app.py` builds the application (Serve config files name `loraplex.cluster.app:build_app`);
`loraplex serve-ray` starts it on a local or existing Ray cluster. Needs the `ray` extra.
Nothing outside this package imports it (an import-linter contract).
"""
