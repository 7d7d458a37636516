"""Load test of `ocula serve` on 127.0.0.1: throughput, p50 / p99 latency and errors at 1, 4 and 16 concurrent
clients, for the bundled digit model and a WBC segmentation model; then overload (more clients than the server
holds) to show it sheds load with 503 + Retry-After and serves again right after.

    python benchmarks/serve.py --wbc runs/segment/wbc-sigtuple-unet/model.ocula [--data-dir ../shared/datasets]

Bounded: every phase stops after its request count or its time cap, whichever comes first; the server is started
here, listens on 127.0.0.1 only, and is stopped at the end. The clients (one asyncio loop, keep-alive connections)
run on the same two cores as the server, so the figures include their cost.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

from ocula.data.digit_photo import prepare_digit  # noqa: E402
from ocula.data.registry import find_root, get_info  # noqa: E402
from ocula.demo import SAMPLES  # noqa: E402
from ocula.weights import DIGIT_MODEL  # noqa: E402

HOST = "127.0.0.1"
SMEAR = "SigTuple_data/Train_Data/1467973104.jpg"  # a 344x366 smear crop with one white cell


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(models: list[str], max_concurrent: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ocula", "serve", *models, "--host", HOST, "--port", str(port),
                             "--max-concurrent", str(max_concurrent)], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if request(http.client.HTTPConnection(HOST, port, timeout=5), "GET", "/health")[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def request(conn, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn.request(method, path, body, headers or {})
    response = conn.getresponse()
    response.read()
    return response.status, response.getheader("Retry-After")


def form(image: bytes, model: str) -> tuple[bytes, dict]:
    """A multipart/form-data body, built once and sent many times."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="stages"\r\n\r\nfalse\r\n'.encode(),
             f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n'
             f'Content-Type: application/octet-stream\r\n\r\n'.encode() + image + b"\r\n",
             f"--{boundary}--\r\n".encode()]
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def load(port: int, body: bytes, headers: dict, n: int, clients: int, cap_seconds: float) -> dict:
    """`clients` concurrent keep-alive connections send requests until `n` are sent or the time is up. One asyncio
    loop on raw sockets: a client of threads adds its own GIL waits to the latencies it measures."""
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": HOST, "Content-Length": len(body), **headers}.items())
    raw = f"POST /v1/predict HTTP/1.1\r\n{head}\r\n".encode() + body
    results, left = [], [n]

    async def client(deadline):
        reader, writer = await asyncio.open_connection(HOST, port)
        while left[0] > 0 and time.perf_counter() < deadline:
            left[0] -= 1
            t = time.perf_counter()
            try:
                writer.write(raw)
                lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
                fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                await reader.readexactly(int(fields["content-length"]))
                results.append((int(lines[0].split()[1]), time.perf_counter() - t, fields.get("retry-after")))
            except (OSError, asyncio.IncompleteReadError, KeyError, ValueError):
                results.append((0, time.perf_counter() - t, None))
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
        writer.close()

    async def run():
        deadline = time.perf_counter() + cap_seconds
        await asyncio.gather(*(client(deadline) for _ in range(clients)))

    start = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - start
    ok = np.array([s for st, s, _ in results if st == 200]) * 1000
    shed = [r for r in results if r[0] == 503]
    return {"sent": len(results), "ok": len(ok), "shed": len(shed),
            "shed_with_retry_after": sum(r[2] is not None for r in shed),
            "shed_p99": np.percentile([r[1] for r in shed], 99) * 1000 if shed else float("nan"),
            "failed": len(results) - len(ok) - len(shed), "rps": len(ok) / seconds,
            "p50": np.percentile(ok, 50) if len(ok) else float("nan"),
            "p99": np.percentile(ok, 99) if len(ok) else float("nan")}


def row(name: str, clients: int, r: dict) -> list:
    return [name, clients, r["sent"], r["ok"], r["failed"], f"{r['rps']:.0f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}",
            f"{os.getloadavg()[0]:.1f}"]


def digit_inputs() -> dict[str, bytes]:
    photo = (SAMPLES / "digit-5.jpg").read_bytes()
    # The same photo already in the model's 28x28 form (what a client that prepares its own input sends): the
    # server runs only the network on it.
    small, _ = prepare_digit(Image.open(io.BytesIO(photo)), style="mnist", size=(28, 28))
    buf = io.BytesIO()
    Image.fromarray(small.round().astype(np.uint8)).save(buf, format="PNG")
    return {"digit, 28x28 PNG": buf.getvalue(), "digit, 640x480 phone photo": photo}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wbc", required=True, help="a WBC segmentation model file (an .onnx beside it is used)")
    ap.add_argument("--data-dir")
    ap.add_argument("--requests", type=int, default=2000, help="per phase for the 28x28 digit")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--cap", type=float, default=60.0, help="seconds at most per phase")
    args = ap.parse_args()
    smear = (find_root(get_info("wbc-sigtuple"), args.data_dir) / SMEAR).read_bytes()
    digit, wbc = "digits-mnist", Path(args.wbc).stem
    phases = [(name, form(image, digit), args.requests if "28x28" in name else args.requests // 5)
              for name, image in digit_inputs().items()]
    phases.append(("WBC smear 344x366 (segment)", form(smear, wbc), args.requests // 10))
    load_before = os.getloadavg()
    proc, port = start_server([str(DIGIT_MODEL), args.wbc], max_concurrent=32)
    try:
        rows = []
        for name, (body, headers), n in phases:
            load(port, body, headers, min(n, 20), 1, args.cap)  # warm-up: first calls build ORT / torch state
            for clients in args.clients:
                rows.append(row(name, clients, load(port, body, headers, n, clients, args.cap)))
                print(rows[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    # Overload: a server holding 4 predictions, 32 clients sending smears for at most 15 s.
    proc, port = start_server([args.wbc], max_concurrent=4)
    try:
        body, headers = form(smear, wbc)
        burst = load(port, body, headers, 20 * args.requests, 32, min(args.cap, 15))
        after = load(port, body, headers, 20, 1, args.cap)
    finally:
        proc.terminate()
        proc.wait(30)
    table = markdown_table(["input", "clients", "requests", "ok", "failed", "ok / s", "p50 ms", "p99 ms",
                            "load (1 min) after"], rows)
    overload = (f"Overload: `--max-concurrent 4` with 32 clients sending the smear: {burst['sent']} requests, "
                f"{burst['ok']} answered ({burst['rps']:.1f} / s, p99 {burst['p99']:.0f} ms), {burst['shed']} shed "
                f"with 503 ({burst['shed_with_retry_after']} carrying Retry-After, p99 {burst['shed_p99']:.1f} ms), "
                f"{burst['failed']} failed "
                f"otherwise; right after, {after['ok']} of {after['sent']} sequential requests answered 200.")
    record("Serving: ocula serve on 127.0.0.1", f"{table}\n\n{overload}\n\nLoad average before the run (1 / 5 / 15 "
           f"min): {' / '.join(f'{v:.2f}' for v in load_before)}. Models: {DIGIT_MODEL.name} (ONNX Runtime), "
           f"{Path(args.wbc).name} ({'ONNX Runtime' if Path(args.wbc).with_suffix('.onnx').is_file() else 'torch'}"
           "). Requests are multipart forms without the stage images (stages=false); the 28x28 PNG skips the "
           "photo recipe, the phone photo runs it (lighting correction, Otsu, crop, centre of mass).")


if __name__ == "__main__":
    main()
