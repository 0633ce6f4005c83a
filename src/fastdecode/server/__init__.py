"""`fastdecode serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

schemas (request bodies: strict, every field honoured or refused), options (the methods and bounded
options a client may choose; files and memory are the operator's), drafter_pool (drafters kept
between requests, LRU-bounded), worker (the loop that runs the scheduler), metrics (Prometheus,
vLLM's names), app (the routes, the API key, the body limit), serve (the process: model on the main
thread, web server beside it, drain on SIGTERM).
"""
