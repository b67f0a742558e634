"""Tests for app.py: the HTTP API against real servers on ephemeral ports (the real infer.Pipeline on the
tiny untrained checkpoints of conftest.py): DICOM, PNG and JPEG uploads, every error status, the inference
queue, the access token, no patient data in logs or responses, the command line's refusals; and the page
driven in headless Chromium over the W3C WebDriver protocol (chromedriver, spoken to with urllib).

    python -m pytest -q tests/test_app.py
    DERNET_SCREENSHOT=docs/app_screenshot.png python -m pytest -q tests/test_app.py -k browser
"""
import base64
import hashlib
import http.client
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

import app
from data import load_image, load_split, to_uint8
from dernet import MEMBERS
from infer import InferConfig, InferError, Pipeline

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
PATIENT_NAME = "DOE^JANE^ZEBULON"            # written into one DICOM; must never leave the server
PATIENT_ID = "PID-77231-SECRET"
LIME_SAMPLES = 16                            # enough for a LIME round trip, fast on CPU
LOG_LINE = re.compile(r"^(-|[A-Z]+) (-|/[a-z/]*) \d{3} in=\d+ out=\d+ \d+ms$")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = "/usr/lib/chromium/chromium"      # Debian's binary (/usr/bin/chromium is a shell wrapper)
BROWSER_WAIT_S = 60


# -----------------------------------------------------------------------------
# helpers

def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers with lower-case names, body bytes) of one request; http.client sets Content-Length."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw_request(server, head: str, body: bytes = b"", wait_s: float = 0.0) -> tuple[int, dict, bytes]:
    """Send a hand-written request head (and body), optionally pause, then read the response."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode("ascii") + b"\r\n" + body)
        time.sleep(wait_s)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def error_of(status: int, headers: dict, body: bytes) -> str:
    """The one-line error message of a JSON error response (and its common headers checked)."""
    assert headers["content-type"].startswith("application/json"), (status, headers)
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
    message = json.loads(body)["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message
    return message


def decode_png(b64: str) -> np.ndarray:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


class GatedPipeline:
    """The real pipeline, whose analyze() first waits for the test (a worker busy with a long job)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline, self.entered, self.release = pipeline, threading.Event(), threading.Event()

    def analyze(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(60)
        return self.pipeline.analyze(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


# -----------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def pipeline(tiny_models) -> Pipeline:
    return Pipeline(InferConfig(cls_ckpt=str(tiny_models.cls_ckpt), det_ckpt=str(tiny_models.det_ckpt),
                                device="cpu", precision="fp32", lime_samples=LIME_SAMPLES))


@pytest.fixture(scope="module")
def server(pipeline):
    with app.serve_in_thread(app.AppConfig(port=0), pipeline) as srv:
        yield srv


@pytest.fixture(scope="module")
def token_server(pipeline):
    with app.serve_in_thread(app.AppConfig(port=0, token=TOKEN), pipeline) as srv:
        yield srv


@pytest.fixture(scope="module")
def abnormal_dicom(synthetic_root) -> Path:
    """A synthetic DICOM with annotated lesions."""
    return next(r.path for r in load_split(synthetic_root, "train") if len(r.boxes))


@pytest.fixture(scope="module")
def uploads(abnormal_dicom) -> dict[str, bytes]:
    """The same radiograph as DICOM, PNG and JPEG bytes."""
    img, _ = load_image(abnormal_dicom)
    u8 = to_uint8(img)
    return {"dicom": abnormal_dicom.read_bytes(),
            "png": cv2.imencode(".png", u8)[1].tobytes(),
            "jpeg": cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()}


@pytest.fixture(scope="module")
def patient_dicom(abnormal_dicom) -> bytes:
    """The abnormal DICOM with identifying patient fields filled in."""
    ds = pydicom.dcmread(abnormal_dicom)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
    buf = io.BytesIO()
    with pydicom.config.disable_value_validation():      # VinDr-style 32-hex UIDs, as write_dicom
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# -----------------------------------------------------------------------------
# page, health, analysis, explanations

def test_page_and_security_headers(server, pipeline):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    html = body.decode("utf-8")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    for tag in ("script", "style"):       # every inline block allowed by its own hash, nothing else
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert len(blocks) == 1
        digest = base64.b64encode(hashlib.sha256(blocks[0].encode("utf-8")).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert "http://" not in html and "https://" not in html and " style=" not in html
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert "Decision support for research use, not a diagnosis" in html

    status, headers, body = request(server, "GET", "/api/health")
    assert status == 200 and headers["cache-control"] == "no-store"
    health = json.loads(body)
    assert health["ready"] is True and health["app"]["token_required"] is False
    assert {k: v for k, v in health.items() if k != "app"} == json.loads(json.dumps(pipeline.health()))
    assert set(health["dernet"]["members"]) == set(MEMBERS) and 0 < health["dernet"]["tau"] < 1


@pytest.mark.parametrize("fmt", ["dicom", "png", "jpeg"])
def test_analyze(server, pipeline, uploads, fmt):
    body = uploads[fmt]
    # a misleading Content-Type: the type comes from the bytes
    status, headers, raw = request(server, "POST", "/api/analyze", body, {"Content-Type": "text/plain"})
    assert status == 200, raw[:300]
    assert headers["cache-control"] == "no-store" and headers["x-frame-options"] == "DENY"
    payload = json.loads(raw)
    result, images = payload["result"], payload["images"]
    direct = pipeline.analyze(body, name="upload")           # the same pipeline, called directly
    expect = direct.result
    assert result["file"] == "upload" and result["decision"] == expect["decision"]
    assert result["image_size"] == expect["image_size"] == list(load_image(body)[0].shape)
    assert result["score"] == pytest.approx(expect["score"], abs=1e-6)
    assert result["member_probs"] == pytest.approx(expect["member_probs"], abs=1e-6)
    assert [b["class"] for b in result["boxes"]] == [b["class"] for b in expect["boxes"]]
    # the images are the pipeline's own, losslessly: windowed (H, W) gray, annotated (H, W, 3)
    windowed, annotated = decode_png(images["windowed"]), decode_png(images["annotated"])
    np.testing.assert_array_equal(windowed, to_uint8(direct.image))
    np.testing.assert_array_equal(annotated, cv2.cvtColor(pipeline.render(direct), cv2.COLOR_RGB2BGR))
    assert b"SYNTHETIC" not in raw                             # write_dicom's PatientName / PatientID


def test_explain(server, uploads):
    status, _, raw = request(server, "POST", "/api/explain?method=gradcam", uploads["dicom"])
    assert status == 200, raw[:300]
    gradcam = json.loads(raw)
    assert gradcam["method"] == "gradcam" and set(gradcam["members"]) == set(MEMBERS)
    overlay = decode_png(gradcam["overlay"])
    assert overlay.ndim == 3 and overlay.shape[2] == 3
    assert all(decode_png(b64).shape == overlay.shape for b64 in gradcam["members"].values())

    status, _, raw = request(server, "POST", "/api/explain?method=lime", uploads["png"])
    assert status == 200, raw[:300]
    lime = json.loads(raw)
    assert lime["method"] == "lime" and decode_png(lime["overlay"]).ndim == 3 and lime["time_ms"] > 0

    for query in ("", "?method=shap", "?method=gradcam&method=x"):
        status, headers, raw = request(server, "POST", "/api/explain" + query, uploads["png"])
        assert status == 400 and "gradcam" in error_of(status, headers, raw)


# -----------------------------------------------------------------------------
# errors

def test_error_statuses(server, uploads):
    png = uploads["png"]
    cases = [  # (what, status, method, path, body, headers)
        ("truncated DICOM", 400, "POST", "/api/analyze", uploads["dicom"][:400], {}),
        ("corrupt PNG", 400, "POST", "/api/analyze", png[:8] + b"\0" * 2000, {}),
        ("empty body", 400, "POST", "/api/analyze", b"", {}),
        ("text", 415, "POST", "/api/analyze", b"name,age\nsomeone,42\n" * 10, {"Content-Type": "image/png"}),
        ("GIF", 415, "POST", "/api/explain?method=gradcam", b"GIF89a" + b"\0" * 100, {}),
        ("unknown path", 404, "GET", "/etc/passwd", None, {}),
        ("page by POST", 405, "POST", "/", png, {}),
        ("analyze by GET", 405, "GET", "/api/analyze", None, {}),
        ("PUT", 405, "PUT", "/api/analyze", png, {}),
    ]
    for what, expected, method, path, body, headers in cases:
        status, resp_headers, raw = request(server, method, path, body, headers)
        assert status == expected, (what, raw[:300])
        error_of(status, resp_headers, raw)
        if status == 405:
            assert resp_headers["allow"] in ("GET", "POST")

    host = "Host: 127.0.0.1\n"
    status, headers, raw = raw_request(server, "POST /api/analyze HTTP/1.1\n" + host)   # no Content-Length
    assert status == 411 and "Content-Length" in error_of(status, headers, raw)
    status, headers, raw = raw_request(server, "POST /api/analyze HTTP/1.1\n" + host + "Transfer-Encoding: chunked\n",
                                       b"5\r\nhello\r\n0\r\n\r\n")
    assert status == 411
    limit = int(app.AppConfig.max_upload_mb * app.MIB)
    status, headers, raw = raw_request(server, f"POST /api/analyze HTTP/1.1\n{host}Content-Length: {limit + 1}\n")
    assert status == 413 and "64 MiB" in error_of(status, headers, raw)     # refused before the body
    status, headers, raw = raw_request(server, f"POST /api/analyze HTTP/1.1\n{host}Content-Length: 12abc\n")
    assert status == 400
    status, headers, raw = raw_request(server, "BREW / HTTP/1.1\n" + host)
    assert status == 501 and "BREW" not in error_of(status, headers, raw)
    status, headers, raw = raw_request(server, "GET / HTTP/1.1\nHost: evil.example:80\n")      # DNS rebinding
    assert status == 403
    status, headers, raw = request(server, "POST", "/api/analyze", png, {"Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in error_of(status, headers, raw)
    # the server is still up, and a keep-alive connection survives a 4xx whose body it read
    host_, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host_, port, timeout=60)
    for body, expected in ((b"not an image at all", 415), (png, 200)):
        conn.request("POST", "/api/analyze", body=body)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == expected
    conn.close()


def test_upload_limit_and_read_timeout(pipeline, uploads):
    cfg = app.AppConfig(port=0, max_upload_mb=0.01, read_timeout_s=0.5)
    with app.serve_in_thread(cfg, pipeline) as srv:
        status, headers, raw = request(srv, "POST", "/api/analyze", uploads["png"])        # body really sent
        assert len(uploads["png"]) > 0.01 * app.MIB and status == 413, raw[:300]
        assert headers["connection"] == "close"
        head = "POST /api/analyze HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 1000\n"
        t0 = time.perf_counter()
        status, headers, raw = raw_request(srv, head, b"\x89PNG\r\n\x1a\n", wait_s=0.0)     # 8 of 1000 bytes
        assert status == 408 and time.perf_counter() - t0 < 10
        assert request(srv, "GET", "/api/health")[0] == 200


def test_busy_queue_answers_503(pipeline, uploads):
    gated = GatedPipeline(pipeline)
    with app.serve_in_thread(app.AppConfig(port=0, workers=1, queue=0, retry_after_s=7), gated) as srv:
        first = {}
        thread = threading.Thread(target=lambda: first.update(
            zip(("status", "headers", "body"), request(srv, "POST", "/api/analyze", uploads["png"]))))
        thread.start()
        try:
            assert gated.entered.wait(60)
            status, headers, raw = request(srv, "POST", "/api/analyze", uploads["png"])
            assert status == 503 and headers["retry-after"] == "7"
            error_of(status, headers, raw)
            assert request(srv, "GET", "/api/health")[0] == 200      # health needs no inference slot
        finally:
            gated.release.set()
            thread.join(60)
        assert first["status"] == 200
        assert request(srv, "POST", "/api/analyze", uploads["png"])[0] == 200      # the slot was given back


def test_upload_memory_budget(pipeline, uploads):
    """Bodies in memory are bounded too: with one upload held by a busy worker, a second that would
    exceed the budget is refused before it is read, though the inference queue has room."""
    size_mb = len(uploads["png"]) / app.MIB
    gated = GatedPipeline(pipeline)
    cfg = app.AppConfig(port=0, queue=4, max_upload_mb=size_mb * 1.5, upload_budget_mb=size_mb * 1.5)
    with app.serve_in_thread(cfg, gated) as srv:
        first = {}
        thread = threading.Thread(target=lambda: first.update(status=request(srv, "POST", "/api/analyze",
                                                                             uploads["png"])[0]))
        thread.start()
        try:
            assert gated.entered.wait(60)
            status, headers, raw = request(srv, "POST", "/api/analyze", uploads["png"])
            assert status == 503 and "uploads" in error_of(status, headers, raw) and headers["retry-after"]
        finally:
            gated.release.set()
            thread.join(60)
        assert first["status"] == 200
        gated.entered.clear()
        assert request(srv, "POST", "/api/analyze", uploads["png"])[0] == 200     # the budget was given back


def test_connection_limit(pipeline):
    with app.serve_in_thread(app.AppConfig(port=0, max_connections=1), pipeline) as srv:
        with socket.create_connection(srv.server_address[:2], timeout=30):      # one idle connection
            time.sleep(0.2)
            status, headers, raw = request(srv, "GET", "/api/health")
            assert status == 503 and headers["retry-after"] == str(srv.cfg.retry_after_s) and json.loads(raw)["error"]
        deadline = time.monotonic() + 10                                        # its thread ends on EOF
        while request(srv, "GET", "/api/health")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


class BrokenRender(GatedPipeline):
    """The real pipeline with a failing render(): a server-side bug."""

    def analyze(self, *args, **kwargs):
        return self.pipeline.analyze(*args, **kwargs)

    def render(self, analysis):
        raise RuntimeError("render failed for " + PATIENT_NAME)


def test_internal_error_keeps_serving(pipeline, uploads, caplog):
    caplog.set_level(logging.INFO, logger="app")
    with app.serve_in_thread(app.AppConfig(port=0), BrokenRender(pipeline)) as srv:
        status, headers, raw = request(srv, "POST", "/api/analyze", uploads["png"])
        assert status == 500 and PATIENT_NAME not in error_of(status, headers, raw)
        assert request(srv, "GET", "/api/health")[0] == 200
    assert "internal error RuntimeError at" in caplog.text and "ZEBULON" not in caplog.text


def test_token(token_server, uploads):
    assert request(token_server, "GET", "/")[0] == 200                  # the page itself holds no data
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer " + TOKEN[:-1] + "x"},
                    {"Authorization": "Basic " + TOKEN}, {"Authorization": TOKEN}):
        status, resp_headers, raw = request(token_server, "GET", "/api/health", None, headers)
        assert status == 401 and resp_headers["www-authenticate"].startswith("Bearer")
        error_of(status, resp_headers, raw)
        status, _, _ = request(token_server, "POST", "/api/analyze", uploads["png"], headers)
        assert status == 401
    auth = {"Authorization": "Bearer " + TOKEN}
    status, _, raw = request(token_server, "GET", "/api/health", None, auth)
    assert status == 200 and json.loads(raw)["app"]["token_required"] is True
    assert request(token_server, "POST", "/api/analyze", uploads["png"], auth)[0] == 200


# -----------------------------------------------------------------------------
# privacy

def test_no_patient_data_in_logs_or_responses(server, patient_dicom, caplog, capfd):
    assert PATIENT_NAME.encode() in patient_dicom
    caplog.set_level(logging.INFO, logger="app")
    bodies = []
    for method, path, body in (("POST", "/api/analyze", patient_dicom),
                               ("POST", "/api/explain?method=gradcam", patient_dicom),
                               ("POST", "/api/analyze", patient_dicom[:600]),      # unreadable: 400
                               ("POST", "/api/analyze?name=" + PATIENT_NAME, b"x")):
        status, headers, raw = request(server, method, path, body)
        assert status in (200, 400, 415)
        bodies.append(raw + json.dumps(headers).encode())
    deadline = time.monotonic() + 5  # the server logs a request after its response is sent
    while len([r for r in caplog.records if r.name == "app"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    out, err = capfd.readouterr()
    records = [r for r in caplog.records if r.name == "app"]
    assert len(records) >= 4 and all(LOG_LINE.match(r.getMessage()) for r in records), caplog.text
    for secret in ("ZEBULON", "DOE^JANE", PATIENT_ID, "19700101"):
        assert secret not in caplog.text and secret not in out and secret not in err
        assert all(secret.encode() not in b for b in bodies)


# -----------------------------------------------------------------------------
# command line

def test_cli_refusals(tmp_path, monkeypatch):
    """One-line errors, exit status 2: no checkpoint (names the training command), and (before any model
    loads) a non-loopback address without a token."""
    env = {k: v for k, v in os.environ.items() if k != app.TOKEN_ENV}
    proc = subprocess.run([sys.executable, "app.py", "--port", "0", "--runs", str(tmp_path / "empty")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "python train.py" in proc.stderr, proc.stderr
    monkeypatch.delenv(app.TOKEN_ENV, raising=False)
    with pytest.raises(app.AppError, match=app.TOKEN_ENV):
        app.main(app.get_args_parser().parse_args(["--host", "0.0.0.0", "--runs", str(tmp_path / "empty")]))
    monkeypatch.setenv(app.TOKEN_ENV, TOKEN)         # the token from the environment passes the check,
    with pytest.raises(InferError, match="python train.py"):      # so the next problem is the missing model
        app.main(app.get_args_parser().parse_args(["--host", "0.0.0.0", "--runs", str(tmp_path / "empty")]))
    assert app.is_loopback("127.0.0.1") and app.is_loopback("::1") and app.is_loopback("localhost")
    assert not any(map(app.is_loopback, ("", "0.0.0.0", "::", "192.168.1.5", "example.org")))
    with pytest.raises(app.AppError, match="16"):
        app.check_config(app.AppConfig(host="0.0.0.0", token="short"))


# -----------------------------------------------------------------------------
# the page in a real browser (headless Chromium through chromedriver's W3C WebDriver endpoint)

class WebDriver:
    """The few W3C WebDriver commands the test needs, over urllib (no selenium)."""
    ELEMENT = "element-6066-11e4-a52e-4f735466cecf"   # W3C web element identifier

    def __init__(self, tmp_path: Path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.session = None
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.call("GET", "/status")["ready"]:
                    break
            except (OSError, AssertionError):
                pass
            assert time.monotonic() < deadline, "chromedriver did not start"
            time.sleep(0.1)
        binary = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
        options = {"args": args, **({"binary": binary} if binary else {})}
        caps = {"browserName": "chrome", "goog:chromeOptions": options, "goog:loggingPrefs": {"browser": "ALL"}}
        self.session = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def call(self, method: str, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=90) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"webdriver {method} {path}: {err.read()[:400]!r}") from None

    def cmd(self, method: str, path: str, payload: dict | None = None):
        return self.call(method, f"/session/{self.session}{path}", payload)

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[self.ELEMENT]

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, script: str, what: str, timeout: float = BROWSER_WAIT_S):
        """Poll a JS expression until it is truthy; fail with the page's status line."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(f"return ({script});")
            if value:
                return value
            status = self.js("const s = document.getElementById('status'); return s ? s.textContent : '';")
            assert time.monotonic() < deadline, f"timed out waiting for {what}; page status: {status!r}"
            time.sleep(0.1)

    def close(self):
        try:
            if self.session:
                self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def browser(tmp_path):
    if not os.access(CHROMEDRIVER, os.X_OK):
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    driver = WebDriver(tmp_path)
    try:
        yield driver
    finally:
        driver.close()


def by_id(name: str) -> str:
    return f"document.getElementById('{name}')"


def test_browser(browser, server, token_server, abnormal_dicom, uploads, tmp_path):
    expected = json.loads(request(server, "POST", "/api/analyze", uploads["dicom"])[2])
    w = browser
    w.cmd("POST", "/window/rect", {"width": 1360, "height": 1000})
    w.cmd("POST", "/url", {"url": server.url + "/"})
    # 1. the inline script and style ran under the CSP (their hashes matched)
    w.wait("document.documentElement.dataset.ready === '1'", "the page script")
    assert w.js(f"return getComputedStyle({by_id('notice')}).backgroundColor;") == "rgb(255, 244, 214)"
    assert "research use, not a diagnosis" in w.js(f"return {by_id('notice')}.textContent;")
    w.wait(f"{by_id('model-info')}.textContent.includes('DERNet')", "the model information")
    # 2. upload the abnormal DICOM through the file input and wait for the result
    w.cmd("POST", f"/element/{w.find('#file-input')}/value", {"text": str(abnormal_dicom)})
    decision = w.wait(f"{by_id('decision')}.dataset.decision", "the decision")
    result = expected["result"]
    assert decision == result["decision"]
    text = w.js(f"return {by_id('decision')}.textContent;")
    if result["decision"] == "normal":
        assert text == "Normal study"
    else:
        assert text.startswith("Abnormal") and all(b["class"] in text for b in result["boxes"])
    score_line = w.js(f"return {by_id('score-line')}.textContent;")
    assert f"{result['score']:.3f}" in score_line and f"{result['threshold']:.3f}" in score_line
    assert w.js(f"return {by_id('members-body')}.rows.length;") == len(MEMBERS)
    assert w.js(f"return {by_id('findings-body')}.rows.length;") == len(result["boxes"])
    # 3. the overlay image rendered at the annotated image's size
    h, w_px = decode_png(expected["images"]["annotated"]).shape[:2]
    size = w.wait(f"{by_id('overlay-img')}.complete && {by_id('overlay-img')}.naturalWidth > 0 && "
                  f"[{by_id('overlay-img')}.naturalWidth, {by_id('overlay-img')}.naturalHeight]", "the overlay")
    assert size == [w_px, h]
    # 4. brightness control: a CSS filter on the displayed image
    w.js(f"const b = {by_id('brightness')}; b.value = 150; b.dispatchEvent(new Event('input'));")
    assert "brightness(1.5)" in w.js(f"return getComputedStyle({by_id('overlay-img')}).filter;")
    # 5. the Grad-CAM toggle shows the heat map (and one map per member)
    w.cmd("POST", f"/element/{w.find('#gradcam-toggle')}/click", {})
    w.wait(f"!{by_id('gradcam-fig')}.hidden && {by_id('gradcam-img')}.complete && "
           f"{by_id('gradcam-img')}.naturalWidth > 0", "the Grad-CAM heat map")
    assert w.js(f"return {by_id('gradcam-toggle')}.getAttribute('aria-pressed');") == "true"
    assert w.js(f"return {by_id('gradcam-members')}.querySelectorAll('img').length;") == len(MEMBERS)
    # 6. screenshot (also to DERNET_SCREENSHOT, for docs/)
    shot = base64.b64decode(w.cmd("GET", "/screenshot"))
    assert cv2.imdecode(np.frombuffer(shot, np.uint8), cv2.IMREAD_COLOR).shape[1] > 0
    (tmp_path / "app.png").write_bytes(shot)
    if os.environ.get("DERNET_SCREENSHOT"):
        target = ROOT / os.environ["DERNET_SCREENSHOT"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(shot)
    # 7. LIME on demand: the button is busy while it runs, then the superpixel overlay shows
    w.cmd("POST", f"/element/{w.find('#lime-toggle')}/click", {})
    w.wait(f"!{by_id('lime-fig')}.hidden && {by_id('lime-img')}.naturalWidth > 0 && "
           f"!{by_id('lime-toggle')}.disabled", "the LIME overlay")
    # 8. no Content-Security-Policy violation or script error in the console
    console = w.cmd("POST", "/se/log", {"type": "browser"})
    assert not [e for e in console if e["level"] == "SEVERE"], console
    # 9. a token-protected server: the page asks once, keeps the token for the tab, then works
    w.cmd("POST", "/url", {"url": token_server.url + "/"})
    w.wait(f"!{by_id('token-panel')}.hidden", "the token prompt")
    w.cmd("POST", f"/element/{w.find('#token-input')}/value", {"text": TOKEN})
    w.cmd("POST", f"/element/{w.find('#token-form button')}/click", {})
    w.wait(f"{by_id('model-info')}.textContent.includes('DERNet')", "the model information after the token")
    assert w.js("return sessionStorage.getItem('dernet-app-token');") == TOKEN
