"""The clinical web app (issue 9): a standard-library HTTP server and one self-contained page over the
Phase III cascade (Algorithm 1, lines 16-22) and its explanations (Fig. 4a-b).

    python app.py                                   # http://127.0.0.1:8000/, newest checkpoints under runs/
    python app.py --cls-ckpt runs/cls/x/dernet.pt --det-ckpt runs/det/y/best.pt
    DERNET_APP_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe())') python app.py --host 0.0.0.0

Routes
    GET  /                              the page (inline CSS and JS, allowed by their CSP hashes)
    GET  /api/health                    readiness, model versions, tau and Omega (infer.Pipeline.health)
    POST /api/analyze                   raw file body -> {"result": infer.py JSON, "images": {"annotated",
                                        "windowed"}: base64 PNGs}
    POST /api/explain?method=gradcam|lime   raw file body -> infer.Pipeline.explain (base64 PNG overlays)

How a request is handled (Handler.dispatch): route -> Host/Origin check -> bearer token (constant-time)
-> Content-Length checked before any byte of the body is read (411, 413) -> body read into memory under a
per-read and a whole-upload timeout (408) -> file type sniffed from the bytes (415) -> a place in the
bounded inference queue (503 + Retry-After when full) -> the models (400 for an unreadable image).
Errors are JSON {"error": "<one line>"}; nothing a client sends can stop the server.

Privacy: uploads stay in memory and are never written to disk; the pipeline is given the name "upload",
never the client's file name; log lines carry method, path, status, sizes and duration only.
"""
import argparse
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from data import DataError, sniff_format
from infer import BACKENDS, PRECISIONS, InferConfig, InferError, Pipeline, encode_png_base64

log = logging.getLogger("app")

TOKEN_ENV = "DERNET_APP_TOKEN"   # the token's environment variable (keeps it out of `ps`)
MIN_TOKEN_CHARS = 16             # ~96 bits as secrets.token_urlsafe(12); shorter tokens are guessable
MIB = 1 << 20
READ_CHUNK = 1 << 20             # body read granularity; the upload deadline is checked between reads
DRAIN_S = 1.0                    # after an early error, read (and drop) the unread body this long so the
                                 #   client sees the response instead of a connection reset
EXPLAIN_METHODS = ("gradcam", "lime")
LOOPBACK_NAMES = ("localhost",)


# -----------------------------------------------------------------------------
# config

@dataclass
class AppConfig:
    host: str = "127.0.0.1"          # loopback by default (issue 9)
    port: int = 8000                 # issue 9
    max_upload_mb: float = 64.0      # issue 9: 64 MiB, above the largest VinDr DICOM (~30 MB)
    token: str | None = None         # bearer token; required off loopback (issue 9)
    workers: int = 1                 # inferences at once: one already uses every CPU core (ours)
    queue: int = 4                   # requests that may wait for a worker; beyond that 503 (ours)
    queue_wait_s: float = 120.0      # longest wait for a worker before 503 (ours: ~4 LIME runs)
    retry_after_s: int = 5           # Retry-After of a 503 (ours: about one analysis on CPU)
    read_timeout_s: float = 30.0     # per socket read, headers and body (slow-client guard; ours)
    upload_timeout_s: float = 300.0  # whole body: 64 MiB at ~1.7 Mbit/s (ours)
    max_connections: int = 64        # open connections = handler threads; beyond that 503 (ours)
    upload_budget_mb: float = 512.0  # request bodies held in memory at once; beyond that 503 (ours: 8 at 64 MiB)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for "", 0.0.0.0 and any other name or address."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_config(cfg: AppConfig) -> None:
    """Raise AppError (one line) for settings the server must not start with."""
    if not is_loopback(cfg.host) and not cfg.token:
        raise AppError(f"--host {cfg.host or '(all interfaces)'} is reachable from other machines; set an access "
                       f"token with {TOKEN_ENV}=... (or --token), or keep the default --host 127.0.0.1")
    if cfg.token is not None and len(cfg.token) < MIN_TOKEN_CHARS:
        raise AppError(f"the access token has {len(cfg.token)} characters, fewer than {MIN_TOKEN_CHARS}; make one "
                       f"with: python -c 'import secrets; print(secrets.token_urlsafe())'")
    if not cfg.max_upload_mb > 0:
        raise AppError("--max-upload-mb must be positive")
    if cfg.workers < 1 or cfg.queue < 0:
        raise AppError("--workers must be at least 1 and --queue at least 0")
    if cfg.upload_budget_mb < cfg.max_upload_mb:
        raise AppError("the upload memory budget must hold at least one upload of --max-upload-mb")


class AppError(RuntimeError):
    """A setting the server cannot start with; str() is one line."""


# -----------------------------------------------------------------------------
# bounded inference

class Busy(Exception):
    """No place in the inference queue."""


class InferenceGate:
    """At most `workers` inferences run at once and at most `queue` more wait; others are refused at once.

    Two semaphores: `admit` counts running + waiting requests (non-blocking acquire -> Busy), `run`
    lets `workers` of them into the models; a waiter gives up after `wait_s` (also Busy)."""

    def __init__(self, workers: int, queue: int, wait_s: float):
        self._admit = threading.BoundedSemaphore(workers + queue)
        self._run = threading.BoundedSemaphore(workers)
        self._wait_s = wait_s

    @contextmanager
    def slot(self):
        if not self._admit.acquire(blocking=False):
            raise Busy
        try:
            if not self._run.acquire(timeout=self._wait_s):
                raise Busy
            try:
                yield
            finally:
                self._run.release()
        finally:
            self._admit.release()


class ByteBudget:
    """Bytes of request bodies held in memory, all requests together: a reservation that does not fit is
    refused (the connection cap alone would allow max_connections x max_upload_mb)."""

    def __init__(self, limit: int):
        self._limit, self._used, self._lock = limit, 0, threading.Lock()

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self._used + n > self._limit:
                return False
            self._used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._used -= n


# -----------------------------------------------------------------------------
# the page: one HTML document; its inline <style> and <script> are allowed by their SHA-256 in the CSP

PAGE_CSS = """
:root { --ink: #1d2430; --muted: #5b6472; --line: #d5dae1; --bg: #f5f7fa; --card: #fff;
        --abn: #b3261e; --nor: #1b6e3a; --accent: #1f5fbf; --warn-bg: #fff4d6; --warn: #6b4e00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       background: var(--bg); }
header { position: sticky; top: 0; z-index: 2; background: var(--card); border-bottom: 1px solid var(--line);
         padding: .6rem 1.2rem; display: flex; flex-wrap: wrap; gap: .4rem 1.5rem; align-items: baseline; }
h1 { font-size: 1.15rem; margin: 0; }
h2 { font-size: 1.3rem; margin: 0 0 .3rem; }
h3 { font-size: .95rem; margin: 1rem 0 .3rem; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
#notice { margin: 0; padding: .15rem .6rem; border-radius: 4px; background: var(--warn-bg); color: var(--warn);
          font-weight: 600; }
main { padding: 1rem 1.2rem; max-width: 1500px; margin: 0 auto; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; }
#token-panel form { display: flex; gap: .5rem; align-items: center; flex-wrap: wrap; }
#drop { display: flex; flex-direction: column; gap: .3rem; align-items: flex-start; border: 2px dashed var(--line);
        border-radius: 8px; padding: .9rem 1rem; background: var(--card); cursor: pointer; }
#drop.over { border-color: var(--accent); background: #eef4ff; }
#drop small { color: var(--muted); }
#status { min-height: 1.5em; margin: .5rem 0; color: var(--muted); }
#status.error { color: var(--abn); font-weight: 600; }
#status.busy::before { content: ""; display: inline-block; width: .9em; height: .9em; margin-right: .45em;
  vertical-align: -.1em; border: 2px solid var(--line); border-top-color: var(--accent); border-radius: 50%;
  animation: spin .8s linear infinite; }
@keyframes spin { to { transform: rotate(360deg); } }
#result { display: grid; grid-template-columns: minmax(0, 1fr) 360px; gap: 1rem; align-items: start; }
@media (max-width: 900px) { #result { grid-template-columns: 1fr; } }
#controls { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; margin-bottom: .6rem; }
#controls label { display: flex; gap: .35rem; align-items: center; }
button { font: inherit; padding: .3rem .8rem; border: 1px solid var(--line); border-radius: 6px;
         background: var(--card); color: var(--ink); cursor: pointer; }
button[aria-pressed="true"] { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: .6; cursor: progress; }
#viewer { display: flex; flex-wrap: wrap; gap: .8rem; }
#viewer figure { margin: 0; flex: 1 1 320px; max-width: 100%; }
#viewer figcaption { color: var(--muted); font-size: .85rem; margin-top: .2rem; }
#viewer img { display: block; filter: brightness(var(--brightness, 1)) contrast(var(--contrast, 1)); }
#viewer > figure > img { width: 100%; height: 68vh; object-fit: contain; object-position: left top; }
#gradcam-members { display: flex; gap: .4rem; flex-wrap: wrap; margin-top: .4rem; }
#gradcam-members figure { flex: 0 1 120px; }
#gradcam-members img { width: 100%; height: auto; }
[aria-busy="true"] { opacity: .55; }
#decision { font-size: 1.35rem; }
#decision.normal { color: var(--nor); }
#decision.abnormal { color: var(--abn); }
.bar { position: relative; height: .7rem; background: #e7ebf0; border-radius: 4px; margin: .35rem 0 .1rem; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); border-radius: 4px; }
.bar .tau { position: absolute; top: -.25rem; bottom: -.25rem; width: 2px; background: var(--ink); }
table { border-collapse: collapse; width: 100%; font-size: .92rem; }
th, td { text-align: left; padding: .2rem .3rem; border-bottom: 1px solid var(--line); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: var(--muted); font-size: .85rem; }
footer { padding: .6rem 1.2rem 1.2rem; color: var(--muted); font-size: .85rem; max-width: 1500px; margin: 0 auto; }
"""

PAGE_JS = r"""
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN_KEY = "dernet-app-token";
  const state = { file: null, payload: null, gen: 0, maxBytes: Infinity, explain: {}, retry: null };

  // --- small DOM helpers: text only, never HTML from data
  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (cls) node.className = cls;
    return node;
  }
  function row(cells) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) tr.append(el("td", text, cls));
    return tr;
  }
  function setStatus(text, kind) {
    const s = $("status");
    s.textContent = text;
    s.className = kind || "";
  }
  function png(b64) { return "data:image/png;base64," + b64; }
  function fmt(x, digits) { return Number(x).toFixed(digits); }

  // --- API calls (bearer token from sessionStorage when the server asks for one)
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(path, options) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers["Authorization"] = "Bearer " + token;
    const resp = await fetch(path, Object.assign({ cache: "no-store", credentials: "omit", headers }, options));
    let body = null;
    try { body = await resp.json(); } catch (err) { body = null; }
    if (!resp.ok) {
      const message = (body && typeof body.error === "string") ? body.error : "HTTP " + resp.status;
      throw new ApiError(resp.status, message);
    }
    return body;
  }
  function handleError(err, retry) {
    if (err.status === 401) {
      if (sessionStorage.getItem(TOKEN_KEY)) sessionStorage.removeItem(TOKEN_KEY);
      state.retry = retry;
      $("token-panel").hidden = false;
      $("token-input").focus();
      setStatus("This server needs an access token.", "error");
    } else {
      setStatus(err.message || String(err), "error");
    }
  }
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    if (!value) return;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token-input").value = "";
    $("token-panel").hidden = true;
    setStatus("");
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  });

  // --- model information (GET /api/health)
  async function loadHealth() {
    try {
      const h = await api("/api/health");
      const parts = [];
      if (h.dernet) {
        parts.push("DERNet: " + (h.dernet.members || []).join(", ") + "; \u03c4 = " + fmt(h.dernet.tau, 3) +
                   "; \u03a9 = [" + (h.dernet.omega || []).map((w) => fmt(w, 2)).join(", ") + "]");
      }
      parts.push(h.detector ? "detector: YOLO11-" + h.detector.scale + " (" + h.detector.stage + ")" : "no detector");
      parts.push("backend " + h.backend + ", " + h.precision + " on " + h.device);
      $("model-info").textContent = parts.join(" \u00b7 ");
      if (h.app && h.app.max_upload_mb) state.maxBytes = h.app.max_upload_mb * 1048576;
    } catch (err) {
      handleError(err, loadHealth);
    }
  }

  // --- analysis (POST /api/analyze with the file as the raw body)
  async function analyze(file) {
    state.file = file;
    state.payload = null;
    state.explain = {};
    const gen = ++state.gen;
    resetExplanations();
    $("result").hidden = true;                 // never show the previous image's result beside a new file
    delete $("decision").dataset.decision;
    if (file.size > state.maxBytes) {
      setStatus("The file is larger than the server's upload limit.", "error");
      return;
    }
    setStatus("Analysing\u2026", "busy");
    $("upload").setAttribute("aria-busy", "true");
    try {
      const payload = await api("/api/analyze", { method: "POST", body: file });
      if (gen !== state.gen) return;
      state.payload = payload;
      showResult(payload);
      setStatus("Done in " + fmt(payload.result.timings_ms.total, 0) + " ms.");
    } catch (err) {
      if (gen === state.gen) handleError(err, () => analyze(file));
    } finally {
      if (gen === state.gen) $("upload").removeAttribute("aria-busy");
    }
  }

  function decisionText(r) {
    if (r.decision === "normal") return "Normal study";
    const names = [...new Set(r.boxes.map((b) => b["class"]))];
    if (names.length) return "Abnormal \u2014 findings: " + names.join(", ");
    return r.detector_ran ? "Abnormal \u2014 no lesion localised above the display confidence"
                          : "Abnormal \u2014 lesion detector not run";
  }

  function showResult(payload) {
    const r = payload.result;
    $("result").hidden = false;
    showImage();
    const d = $("decision");
    d.textContent = decisionText(r);
    d.className = r.decision;
    d.dataset.decision = r.decision;
    const cmp = r.decision === "abnormal" ? " > " : " \u2264 ";     // Algorithm 1, line 17: S > tau
    $("score-line").textContent = "Triage score S = " + fmt(r.score, 3) + cmp + "\u03c4 = " + fmt(r.threshold, 3);
    $("score-fill").style.width = (100 * Math.min(Math.max(r.score, 0), 1)) + "%";
    $("score-tau").style.left = (100 * Math.min(Math.max(r.threshold, 0), 1)) + "%";
    const members = $("members-body");
    members.replaceChildren();
    for (const [name, p] of Object.entries(r.member_probs)) members.append(row([[name], [fmt(p, 3), "num"]]));
    const findings = $("findings-body");
    findings.replaceChildren();
    for (const b of r.boxes) findings.append(row([[b["class"]], [b.lt_code], [fmt(b.score, 2), "num"]]));
    $("findings-table").hidden = r.boxes.length === 0;
    $("findings-note").textContent = r.boxes.length ? "" :
      (r.detector_ran ? "No lesion above the display confidence." : "The detector runs only on abnormal studies.");
    const t = r.timings_ms;
    $("timing").textContent = "decode " + fmt(t.decode, 0) + " ms \u00b7 DERNet " + fmt(t.dernet, 0) +
      " ms \u00b7 detector " + fmt(t.detector, 0) + " ms \u00b7 total " + fmt(t.total, 0) + " ms (" +
      r.backend + ", " + r.precision + "); image " + r.image_size[1] + " \u00d7 " + r.image_size[0] + " px";
  }

  function showImage() {
    if (!state.payload) return;
    const images = state.payload.images;
    $("overlay-img").src = png($("boxes-toggle").checked ? images.annotated : images.windowed);
  }
  $("boxes-toggle").addEventListener("change", showImage);

  // --- explanations (POST /api/explain?method=...), fetched once per image on demand
  const EXPLAIN = {
    gradcam: { button: "gradcam-toggle", figure: "gradcam-fig", image: "gradcam-img",
               busy: "Computing Grad-CAM\u2026" },
    lime: { button: "lime-toggle", figure: "lime-fig", image: "lime-img",
            busy: "Computing LIME (perturbs the image many times; this takes a while)\u2026" },
  };
  function resetExplanations() {
    for (const [method, ui] of Object.entries(EXPLAIN)) {
      $(ui.button).setAttribute("aria-pressed", "false");
      $(ui.button).disabled = false;
      $(ui.figure).hidden = true;
      $(ui.image).removeAttribute("src");
    }
    $("gradcam-members").replaceChildren();
  }
  function showExplanation(method, data) {
    const ui = EXPLAIN[method];
    $(ui.image).src = png(data.overlay);
    if (method === "gradcam") {
      const box = $("gradcam-members");
      box.replaceChildren();
      for (const [name, b64] of Object.entries(data.members || {})) {
        const fig = el("figure");
        const img = el("img");
        img.src = png(b64);
        img.alt = "Grad-CAM of " + name;
        fig.append(img, el("figcaption", name));
        box.append(fig);
      }
    }
    $(ui.figure).hidden = false;
  }
  async function toggleExplanation(method) {
    const ui = EXPLAIN[method];
    const button = $(ui.button);
    if (button.getAttribute("aria-pressed") === "true") {
      button.setAttribute("aria-pressed", "false");
      $(ui.figure).hidden = true;
      return;
    }
    if (!state.file) return;
    button.setAttribute("aria-pressed", "true");
    if (state.explain[method]) { showExplanation(method, state.explain[method]); return; }
    const gen = state.gen;
    button.disabled = true;
    setStatus(ui.busy, "busy");
    try {
      const data = await api("/api/explain?method=" + method, { method: "POST", body: state.file });
      if (gen !== state.gen) return;
      state.explain[method] = data;
      if (button.getAttribute("aria-pressed") === "true") showExplanation(method, data);
      setStatus(method === "lime" ? "LIME done in " + fmt(data.time_ms, 0) + " ms." : "Grad-CAM done.");
    } catch (err) {
      if (gen !== state.gen) return;
      button.setAttribute("aria-pressed", "false");
      handleError(err, () => toggleExplanation(method));
    } finally {
      if (gen === state.gen) button.disabled = false;
    }
  }
  $("gradcam-toggle").addEventListener("click", () => toggleExplanation("gradcam"));
  $("lime-toggle").addEventListener("click", () => toggleExplanation("lime"));

  // --- brightness / contrast (CSS filters on the displayed images only)
  function applyFilters() {
    const viewer = $("viewer");
    viewer.style.setProperty("--brightness", String($("brightness").value / 100));
    viewer.style.setProperty("--contrast", String($("contrast").value / 100));
  }
  $("brightness").addEventListener("input", applyFilters);
  $("contrast").addEventListener("input", applyFilters);
  $("reset-view").addEventListener("click", () => {
    $("brightness").value = 100;
    $("contrast").value = 100;
    applyFilters();
  });

  // --- JSON download of the current result
  $("download").addEventListener("click", () => {
    if (!state.payload) return;
    const blob = new Blob([JSON.stringify(state.payload.result, null, 2)], { type: "application/json" });
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = "dernet-result.json";
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 1000);
  });

  // --- choosing or dropping a file
  $("file-input").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) analyze(file);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) analyze(file);
  });

  loadHealth();
  document.documentElement.dataset.ready = "1";
})();
"""

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>DERNet spinal-lesion triage</title>
<style>{css}</style>
</head>
<body>
<header>
  <h1>DERNet + YOLO11 spinal-lesion triage</h1>
  <p id="notice" role="note">Decision support for research use, not a diagnosis.</p>
</header>
<main>
  <section id="token-panel" class="card" hidden>
    <form id="token-form">
      <label for="token-input">This server needs an access token:</label>
      <input id="token-input" type="password" autocomplete="off" spellcheck="false">
      <button type="submit">Use token</button>
      <span class="muted">kept for this browser tab only</span>
    </form>
  </section>
  <section id="upload">
    <label id="drop" for="file-input">
      <strong>Drop a radiograph here, or choose a file</strong>
      <small>DICOM, PNG or JPEG; analysed in the server's memory and not stored</small>
      <input id="file-input" type="file" accept=".dcm,.dicom,.png,.jpg,.jpeg,application/dicom,image/png,image/jpeg">
    </label>
    <p id="status" role="status" aria-live="polite"></p>
  </section>
  <section id="result" hidden>
    <div class="card">
      <div id="controls">
        <label><input id="boxes-toggle" type="checkbox" checked> lesions</label>
        <button id="gradcam-toggle" type="button" aria-pressed="false">Grad-CAM</button>
        <button id="lime-toggle" type="button" aria-pressed="false">LIME</button>
        <label for="brightness">brightness <input id="brightness" type="range" min="30" max="250" value="100"></label>
        <label for="contrast">contrast <input id="contrast" type="range" min="30" max="300" value="100"></label>
        <button id="reset-view" type="button">reset</button>
      </div>
      <div id="viewer">
        <figure>
          <img id="overlay-img" alt="windowed radiograph with the detected lesions drawn over it">
          <figcaption>windowed image; boxes (and masks) from the lesion detector</figcaption>
        </figure>
        <figure id="gradcam-fig" hidden>
          <img id="gradcam-img" alt="Grad-CAM heat map of the ensemble over the classifier input">
          <figcaption>Grad-CAM, \u03a9-weighted over the DERNet members (classifier input)</figcaption>
          <div id="gradcam-members"></div>
        </figure>
        <figure id="lime-fig" hidden>
          <img id="lime-img" alt="LIME superpixels supporting the abnormal score">
          <figcaption>LIME: superpixels that raise the triage score most</figcaption>
        </figure>
      </div>
    </div>
    <aside id="report" class="card">
      <h2 id="decision"></h2>
      <p id="score-line"></p>
      <div class="bar"><div id="score-fill" class="fill"></div><div id="score-tau" class="tau"></div></div>
      <p class="muted">score bar; the black mark is the decision threshold \u03c4</p>
      <h3>Ensemble members</h3>
      <table><thead><tr><th>member</th><th class="num">P(abnormal)</th></tr></thead>
        <tbody id="members-body"></tbody></table>
      <h3>Findings</h3>
      <table id="findings-table"><thead><tr><th>lesion</th><th>code</th><th class="num">confidence</th></tr></thead>
        <tbody id="findings-body"></tbody></table>
      <p id="findings-note" class="muted"></p>
      <p id="timing" class="muted"></p>
      <button id="download" type="button">Download JSON</button>
    </aside>
  </section>
</main>
<footer><p id="model-info"></p>
  <p>Decision support for research use, not a diagnosis. Uploaded images are processed in memory and never stored.</p>
</footer>
<script>{js}</script>
</body>
</html>
"""


def csp_hash(source: str) -> str:
    """CSP source expression allowing exactly this inline script or style (CSP3 hash-source)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


@cache
def page() -> tuple[bytes, str]:
    """(the page's UTF-8 bytes, its Content-Security-Policy). Static, so built once on first use."""
    html = PAGE_HTML.replace("{css}", PAGE_CSS).replace("{js}", PAGE_JS)
    csp = ("default-src 'none'; "
           f"script-src {csp_hash(PAGE_JS)}; style-src {csp_hash(PAGE_CSS)}; "
           "img-src 'self' data:; connect-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
           "require-trusted-types-for 'script'; trusted-types 'none'")
    return html.encode("utf-8"), csp


API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


# -----------------------------------------------------------------------------
# request handling

class HTTPError(Exception):
    """An error response: status, one-line message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, " ".join(message.split()), headers or {}


ROUTES = {  # path -> {method: handler name}
    "/": {"GET": "get_page"},
    "/api/health": {"GET": "get_health"},
    "/api/analyze": {"POST": "post_analyze"},
    "/api/explain": {"POST": "post_explain"},
}


class Handler(BaseHTTPRequestHandler):
    """One connection (HTTP/1.1 keep-alive); every response goes through `respond`, which also logs."""
    protocol_version = "HTTP/1.1"
    server_version = "dernet-app"

    def version_string(self) -> str:
        return self.server_version          # no Python version in the Server header

    # --- plumbing

    def setup(self):
        self.timeout = self.server.cfg.read_timeout_s        # socket timeout for every read (slow clients)
        super().setup()

    def handle_one_request(self):
        self.t0 = time.perf_counter()
        self.body_read = 0          # bytes of the body consumed
        self.reserved = 0           # bytes of the upload budget this request holds
        self.route = None           # the matched path, for logs (unmatched paths are not logged)
        super().handle_one_request()

    def log_message(self, format, *args):
        """Silence http.server's own lines: they can carry the raw request line and client address."""

    def log_request(self, code="-", size="-"):
        """Logged by `respond` instead."""

    def body_pending(self) -> bool:
        """A request body was announced and not (all) read: the connection cannot be reused."""
        headers = getattr(self, "headers", None)
        if headers is None:
            return False
        if "Transfer-Encoding" in headers:
            return True
        raw = (headers.get("Content-Length") or "0").strip()
        return not raw.isdigit() or int(raw) > self.body_read

    def respond(self, status: int, body: bytes, content_type: str, headers: dict | None = None,
                csp: str = API_CSP):
        """Send a complete response with the security headers; log method, path, status, sizes, duration."""
        self.release_upload()        # before the client can send its next request
        close = self.body_pending() or getattr(self, "close_connection", True)
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", csp)
            self.send_header("Cache-Control", "no-store")
            for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
                self.send_header(key, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:              # the client went away; nothing to send it
            self.close_connection = True
        if close and self.body_pending():
            self.drain()
        ms = 1000 * (time.perf_counter() - getattr(self, "t0", time.perf_counter()))
        log.info("%s %s %d in=%d out=%d %.0fms", self.command or "-", self.route or "-", status,
                 getattr(self, "body_read", 0), len(body), ms)

    def release_upload(self):
        """Give back this request's share of the upload memory budget (idempotent)."""
        if getattr(self, "reserved", 0):
            self.server.uploads.release(self.reserved)
            self.reserved = 0

    def drain(self):
        """Read and drop what the client is still sending, briefly, so it sees our error response instead
        of a connection reset (closing a socket with unread data resets it)."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(DRAIN_S)
            deadline = time.monotonic() + DRAIN_S
            while time.monotonic() < deadline and self.connection.recv(READ_CHUNK):
                pass
        except OSError:
            pass

    def respond_json(self, status: int, payload, headers: dict | None = None):
        self.respond(status, json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8"),
                     "application/json; charset=utf-8", headers)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, 501 unknown method, ...) as JSON; the raw request
        text is not echoed."""
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.close_connection = True
        self.respond_json(code, {"error": f"{phrase.lower()}; this server speaks the JSON API under /api/"})

    # --- dispatch

    def dispatch(self):
        try:
            url = urlsplit(self.path)
            methods = ROUTES.get(url.path)
            if methods is None:
                raise HTTPError(404, "no such page; the page is / and the API is under /api/")
            self.route = url.path
            handler = methods.get(self.command)
            if handler is None:
                raise HTTPError(405, f"{self.command} is not allowed here; use {' or '.join(methods)}",
                                {"Allow": ", ".join(methods)})
            self.check_host()
            if url.path.startswith("/api/"):
                self.check_token()
            try:
                getattr(self, handler)(url)
            finally:
                self.release_upload()
        except HTTPError as err:
            self.respond_json(err.status, {"error": err.message}, err.headers)
        except Exception as err:     # a bug, not the client's fault: keep serving, log where (not what)
            frame = traceback.extract_tb(err.__traceback__)[-1]
            log.error("internal error %s at %s:%d", type(err).__name__, os.path.basename(frame.filename), frame.lineno)
            self.respond_json(500, {"error": "internal server error; the server log says where"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = dispatch

    # --- guards

    def check_host(self):
        """On loopback, only loopback Host names (DNS rebinding) and no cross-origin POSTs (a web page the
        user visits could otherwise make the browser upload to this server)."""
        host = self.headers.get("Host", "")
        if is_loopback(self.server.cfg.host) and host:
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                raise HTTPError(403, "requests must address the server by a loopback name (127.0.0.1 or localhost)")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and urlsplit(origin).netloc != host:
            raise HTTPError(403, "cross-origin requests are refused; use the page served by this server")

    def check_token(self):
        token = self.server.cfg.token
        if not token:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        ok = hmac.compare_digest(given.strip().encode("utf-8", "replace"), token.encode("utf-8"))
        if scheme.lower() != "bearer" or not ok:
            raise HTTPError(401, "missing or wrong access token; send Authorization: Bearer <token>",
                            {"WWW-Authenticate": 'Bearer realm="dernet"'})

    def read_body(self) -> bytes:
        """The request body, in memory. Length checks come before the first byte is read."""
        cfg = self.server.cfg
        if "Transfer-Encoding" in self.headers:
            raise HTTPError(411, "chunked uploads are not supported; send the file with a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HTTPError(411, "Content-Length required; send the file as the raw request body")
        if not raw.strip().isdigit():
            raise HTTPError(400, "Content-Length is not a byte count")
        n, limit = int(raw), int(cfg.max_upload_mb * MIB)
        if n > limit:
            raise HTTPError(413, f"the upload is {n / MIB:.1f} MiB, over the {cfg.max_upload_mb:g} MiB limit "
                                 f"(--max-upload-mb)")
        if n == 0:
            raise HTTPError(400, "empty upload; send a DICOM, PNG or JPEG file as the request body")
        if not self.server.uploads.reserve(n):
            raise HTTPError(503, "the server is receiving too many uploads; try again shortly",
                            {"Retry-After": str(cfg.retry_after_s)})
        self.reserved = n
        buf = bytearray(n)
        view = memoryview(buf)
        deadline = time.monotonic() + cfg.upload_timeout_s
        while self.body_read < n:
            if time.monotonic() > deadline:
                raise HTTPError(408, "the upload took too long; try again on a faster connection")
            try:
                got = self.rfile.readinto1(view[self.body_read:self.body_read + READ_CHUNK])
            except TimeoutError:
                raise HTTPError(408, "the upload stalled; try again") from None
            if not got:
                raise HTTPError(400, "the upload ended before Content-Length bytes arrived")
            self.body_read += got
        return bytes(buf)

    def read_image(self) -> bytes:
        """The body, if its bytes look like a DICOM, PNG or JPEG file (the Content-Type header is ignored)."""
        body = self.read_body()
        if sniff_format(body) is None:
            raise HTTPError(415, "not a DICOM, PNG or JPEG file; export the radiograph as DICOM or PNG")
        return body

    @contextmanager
    def inference_slot(self):
        try:
            with self.server.gate.slot():
                yield
        except Busy:
            raise HTTPError(503, "the server is busy with other images; try again shortly",
                            {"Retry-After": str(self.server.cfg.retry_after_s)}) from None

    def on_worker(self, fn, *args):
        """fn(*args) on one of the server's inference threads (the caller holds an inference slot)."""
        return self.server.workers.submit(fn, *args).result()

    def analyze(self, body: bytes):
        """Pipeline.analyze under the caller's inference slot; unreadable images are the client's 400."""
        try:
            return self.on_worker(self.server.pipeline.analyze, body, "upload")
        except DataError as err:
            raise HTTPError(400, str(err)) from None

    # --- routes

    def get_page(self, url):
        html, csp = page()
        self.respond(200, html, "text/html; charset=utf-8", csp=csp)

    def get_health(self, url):
        cfg = self.server.cfg
        app = {"max_upload_mb": cfg.max_upload_mb, "token_required": bool(cfg.token),
               "workers": cfg.workers, "queue": cfg.queue}
        self.respond_json(200, {**self.server.pipeline.health(), "app": app})

    def post_analyze(self, url):
        body = self.read_image()
        with self.inference_slot():
            analysis = self.analyze(body)
            images = self.on_worker(lambda: {
                "annotated": encode_png_base64(self.server.pipeline.render(analysis)),   # (H, W, 3)
                "windowed": encode_png_base64(analysis.image)})                          # (H, W) [0, 1]
        self.respond_json(200, {"result": analysis.result, "images": images})

    def post_explain(self, url):
        values = parse_qs(url.query).get("method", [])
        method = values[0] if len(values) == 1 else None
        if method not in EXPLAIN_METHODS:
            raise HTTPError(400, f"explain needs ?method= one of {', '.join(EXPLAIN_METHODS)}")
        body = self.read_image()
        with self.inference_slot():
            analysis = self.analyze(body)
            explanation = self.on_worker(self.server.pipeline.explain, analysis, method)
        self.respond_json(200, explanation)


# -----------------------------------------------------------------------------
# server

BUSY_BODY = b'{"error":"the server has too many open connections; try again shortly"}'


class AppServer(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the config, the loaded pipeline and the inference gate. Connections
    beyond cfg.max_connections get a 503 at once instead of a thread."""
    daemon_threads = True

    def __init__(self, cfg: AppConfig, pipeline: Pipeline):
        self.cfg, self.pipeline = cfg, pipeline
        self.gate = InferenceGate(cfg.workers, cfg.queue, cfg.queue_wait_s)
        # The models run on `workers` long-lived threads, not on the short-lived connection threads:
        # every new thread that allocates tensors gets its own allocator arena and oneDNN caches, and
        # a thread per request made the server's memory grow by gigabytes under load (bench.py app).
        self.workers = ThreadPoolExecutor(cfg.workers, thread_name_prefix="inference")
        self.connections = threading.BoundedSemaphore(cfg.max_connections)
        self.uploads = ByteBudget(int(cfg.upload_budget_mb * MIB))
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        super().__init__((cfg.host.strip("[]"), cfg.port), Handler)

    def server_close(self):
        super().server_close()
        self.workers.shutdown(wait=False, cancel_futures=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(BUSY_BODY)}\r\nRetry-After: {self.cfg.retry_after_s}\r\n"
                    f"Connection: close\r\n\r\n").encode("ascii")
            try:
                request.sendall(head + BUSY_BODY)
            except OSError:
                pass
            log.info("- - 503 connection limit")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        """A connection-level failure (reset, timeout while parsing): one line, no traceback, keep serving."""
        err = sys.exc_info()[1]
        log.info("connection error %s", type(err).__name__)


def make_server(cfg: AppConfig, pipeline: Pipeline) -> AppServer:
    """A bound, not yet serving server (port 0 picks a free port: see server.url)."""
    check_config(cfg)
    return AppServer(cfg, pipeline)


@contextmanager
def serve_in_thread(cfg: AppConfig, pipeline: Pipeline):
    """Run a server in a background thread for the duration of a `with` block (tests, bench.py)."""
    server = make_server(cfg, pipeline)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -----------------------------------------------------------------------------
# command line

def get_args_parser() -> argparse.ArgumentParser:
    a, i = AppConfig(), InferConfig()
    p = argparse.ArgumentParser(description="Web app over the DERNet + YOLO11 cascade (decision support for "
                                            "research use, not a diagnosis)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=a.host, help="address to listen on (anything but loopback needs a token)")
    g.add_argument("--port", type=int, default=a.port)
    g.add_argument("--token", help=f"access token for the API (prefer the {TOKEN_ENV} environment variable: "
                                   f"command lines are visible to other users)")
    g.add_argument("--max-upload-mb", type=float, default=a.max_upload_mb, help="largest accepted file, MiB")
    g.add_argument("--workers", type=int, default=a.workers, help="inferences run at once")
    g.add_argument("--queue", type=int, default=a.queue, help="requests that may wait; more get 503")
    g.add_argument("--read-timeout", type=float, default=a.read_timeout_s, help="seconds per socket read")
    g = p.add_argument_group("models (as in infer.py)")
    g.add_argument("--cls-ckpt", help="DERNet checkpoint (default: newest runs/cls/*/dernet.pt)")
    g.add_argument("--det-ckpt", help="detector checkpoint (default: newest runs/{seg,det}/*/best.pt)")
    g.add_argument("--runs", default=i.runs, help="folder searched for the newest checkpoints")
    g.add_argument("--backend", choices=BACKENDS, default=i.backend)
    g.add_argument("--onnx-dir", help="backend onnx: folder with dernet.onnx and detector.onnx")
    g.add_argument("--precision", choices=PRECISIONS, default=i.precision)
    g.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=i.fast_decode,
                   help="reduced-resolution JPEG 2000 decoding")
    g.add_argument("--lime-samples", type=int, default=i.lime_samples, help="LIME perturbations")
    g.add_argument("--device", default=i.device, help="auto | cpu | cuda[:n]")
    return p


def main(args: argparse.Namespace) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    cfg = AppConfig(host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, token=token,
                    workers=args.workers, queue=args.queue, read_timeout_s=args.read_timeout)
    check_config(cfg)                                   # before the (slow) model loading
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    infer_cfg = InferConfig(cls_ckpt=args.cls_ckpt, det_ckpt=args.det_ckpt, runs=args.runs, backend=args.backend,
                            onnx_dir=args.onnx_dir, precision=args.precision, fast_decode=args.fast_decode,
                            lime_samples=args.lime_samples, device=args.device)
    pipeline = Pipeline(infer_cfg)                      # loads, fuses and warms the models once
    try:
        server = make_server(cfg, pipeline)
    except OSError as err:
        raise AppError(f"cannot listen on {cfg.host}:{cfg.port} ({err.strerror or err}); choose another --port")
    log.info("serving on %s/ (%s)", server.url, "token required" if cfg.token else "loopback only")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    cli_args = get_args_parser().parse_args()
    try:
        sys.exit(main(cli_args))
    except (AppError, InferError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
