"""`fastdecode serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

schemas (request bodies, validated), worker (the thread that runs the scheduler), app (the routes).
"""
