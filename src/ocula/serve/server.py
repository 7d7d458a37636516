"""Start the server: load the models (the bundled digit model when none is named), build the app, run uvicorn."""

from __future__ import annotations

from ocula.serve.app import Limits, create_app
from ocula.serve.models import load_served


def run(paths: list[str], *, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
        cors_origins: tuple[str, ...] = ()) -> None:
    import torch
    import uvicorn

    from ocula.weights import DIGIT_MODEL

    # One thread per prediction: the server runs one prediction per core, and more threads would fight over them.
    torch.set_num_threads(1)
    served = load_served(paths or [DIGIT_MODEL])
    app = create_app(served, limits, cors_origins=cors_origins)
    for s in served.values():
        print(f"serving {s.name} ({s.model.info.task}, {s.runtime})")
    shown = f"[{host}]" if ":" in host else host
    print(f"open http://{shown}:{port}/ for the page, http://{shown}:{port}/docs for the API; Ctrl+C stops")
    # Access logs cost more than a small prediction; errors are still logged.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
