"""`minisd serve`: AUTOMATIC1111's web API for existing clients, and a page that shows diffusion happening.

  a1111.py   the /sdapi/v1 request fields in minisd's terms, the limits, the replies
  jobs.py    one model, one job at a time: the FIFO queue and the worker thread that owns the Pipeline
  teach.py   the page's cross-attention word maps
  app.py     the FastAPI routes and the safety rules
  page/      the page: plain HTML and JavaScript, served by the server (no CDN, no build step)

FastAPI and uvicorn are an optional extra: pip install -e ".[serve]".
"""
import threading


def start_in_thread(app, host="127.0.0.1", port=0):
    """Serve `app` with uvicorn on a background thread (tests, bench/serve_load.py). port 0: a free one.
    Returns (server, base url); `server.should_exit = True` stops it."""
    import uvicorn
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        thread.join(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, f"http://{host}:{port}"
