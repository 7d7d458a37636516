"""`ocula serve`: the HTTP face. One process serves the JSON API (`/v1/predict`, `/v1/models`, `/health`, OpenAPI
docs at `/docs`) and the page (`/`, static files in `static/`, nothing fetched from elsewhere) for any number of
model files, each prediction going through `ocula.api.Model` like every other face.

    models.py   load model files by name; ONNX Runtime when an export sits beside the file, else torch
    decode.py   request bytes -> image, with the type checked from the bytes and the size limits
    answers.py  a task's result -> the JSON the API returns (stages, mask and overlay as PNG data URLs)
    app.py      the FastAPI app factory: routes, limits (time, concurrency), one-line JSON errors
    server.py   `run`: load the models (the bundled digit model by default) and start uvicorn
"""
